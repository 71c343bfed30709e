"""Console lines, progress bar, TensorBoard scalars and JSON-lines metrics (written on rank 0)."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from megatron_moe_reg.integration.install import on_console
from megatron_moe_reg.training.distributed import is_rank0


class Reporter:
    """Collects per-step metrics and writes them at the log interval."""

    def __init__(self, cfg, start_iteration: int):
        self.cfg = cfg
        self.rank0 = is_rank0()
        self.writer = None
        self.bar = None
        self.jsonl = None
        self._window: list[dict] = []
        self._window_start = time.time()
        if not self.rank0:
            return
        if cfg.log.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=cfg.log.tensorboard_dir)
        if cfg.log.log_file:
            Path(cfg.log.log_file).parent.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(cfg.log.log_file, "a", buffering=1)
        if cfg.log.progress_bar and sys.stderr.isatty():  # plain lines in logs and batch jobs
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=cfg.train.train_iters, initial=start_iteration, unit="step", dynamic_ncols=True, leave=True
            )

    def _print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def step(self, iteration: int, metrics: dict, step_seconds: float) -> None:
        """Record one training step's metrics (called on every rank; writes on rank 0)."""
        if not self.rank0:
            return
        tokens_per_s = metrics["tokens"] / step_seconds if step_seconds > 0 else math.nan
        metrics = {**metrics, "tokens/s": tokens_per_s, "step seconds": step_seconds}
        self._window.append(metrics)
        if self.writer is not None:
            self.writer.add_scalar("lm loss", metrics["lm loss"], iteration)
            self.writer.add_scalar("learning-rate", metrics["lr"], iteration)
            self.writer.add_scalar("grad-norm", metrics["grad norm"], iteration)
            self.writer.add_scalar("throughput/tokens-per-second", tokens_per_s, iteration)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({"loss": f"{metrics['lm loss']:.3f}", "tok/s": f"{tokens_per_s:,.0f}"}, refresh=False)
        if iteration % self.cfg.log.log_interval == 0 or iteration == self.cfg.train.train_iters:
            self._flush(iteration)

    def _flush(self, iteration: int) -> None:
        window, self._window = self._window, []
        if not window:
            return
        keys = dict.fromkeys(
            k for w in window for k, v in w.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        )
        avg = {}
        for k in keys:  # some metrics (measurements) exist only on some steps
            values = [w[k] for w in window if k in w]
            avg[k] = sum(values) / len(values)
        avg["skipped"] = sum(int(w.get("skipped", False)) for w in window)
        parts = [
            f"iteration {iteration:>6d}/{self.cfg.train.train_iters}",
            f"lm loss {avg['lm loss']:.4f}",
            f"lr {avg['lr']:.3e}",
            f"grad norm {avg['grad norm']:.3f}",
        ]
        shown = {"lm loss", "lr", "grad norm", "tokens", "tokens/s", "step seconds", "skipped"}
        parts += [f"{k} {v:.5g}" for k, v in avg.items() if k not in shown and on_console(k)]
        parts += [f"tokens/s {avg['tokens/s']:,.0f}", f"ms/step {1000 * avg['step seconds']:.0f}"]
        if avg["skipped"]:
            parts.append(f"skipped {avg['skipped']}")
        self._print(" | ".join(parts))
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"iteration": iteration, **avg}) + "\n")

    def evaluation(self, iteration: int, result: dict | None) -> None:
        if not self.rank0 or result is None:
            return
        self._print(f"validation at iteration {iteration} | loss {result['loss']:.4f} | perplexity {result['ppl']:.2f}")
        if self.writer is not None:
            self.writer.add_scalar("validation/lm loss", result["loss"], iteration)
            self.writer.add_scalar("validation/perplexity", result["ppl"], iteration)
        if self.jsonl is not None:
            self.jsonl.write(
                json.dumps({"iteration": iteration, "validation loss": result["loss"], "validation ppl": result["ppl"]})
                + "\n"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
