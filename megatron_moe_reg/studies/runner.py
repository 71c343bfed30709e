"""Running a study: every (variant, seed) a real ``moe-reg pretrain`` in its own directory, then
every checkpoint it saved (intermediate and final) evaluated on the study's fixed held-out tokens
(``analysis.evaluate --every-iteration`` into ``eval/iter_N.json``; the final one is also ``eval.json``).

With an ``[adapt]`` table, each run's final checkpoint then goes through ``moe-reg adapt`` (SR-MoE's
interference test) into ``adapt/adapt.json``, with the run's seed.

Restartable: a run trained, evaluated (and adapted) is skipped; an interrupted training resumes from
its last checkpoint (``--load`` of its own ``ckpt``); checkpoints not yet evaluated are evaluated.
``--parallel N`` runs N at a time with the cores split between them (``OMP_NUM_THREADS``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from megatron_moe_reg.errors import ConfigError, RunStopped
from megatron_moe_reg.studies.spec import StudySpec, parse_variant
from megatron_moe_reg.training.input_checks import TRACKER_FILE

# dry-run estimates before any run finished: examples/tiny_cpu.toml's training throughput on 2 CPU cores
# (log steps included) and a run's start-up plus the evaluation of three checkpoints
TOKENS_PER_SECOND_HINT = 1150
RUN_OVERHEAD_SECONDS_HINT = 35
_LAUNCHER = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run_dir(out: Path, variant: str, seed: int) -> Path:
    return out / "runs" / variant / f"seed{seed}"


def _env(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER}
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def _pretrain_cmd(spec: StudySpec, variant: str, seed: int, where: Path) -> list[str]:
    ckpt = where / "ckpt"
    cmd = [
        sys.executable,
        "-m",
        "megatron_moe_reg.cli",
        "pretrain",
        *spec.flags(variant, seed),
        "--save",
        str(ckpt),
        "--log-file",
        str(where / "log.jsonl"),
        "--no-progress-bar",
    ]
    if (ckpt / TRACKER_FILE).is_file():  # interrupted: resume from its last checkpoint
        cmd += ["--load", str(ckpt)]
    return cmd


def _eval_cmd(spec: StudySpec, where: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "megatron_moe_reg.analysis.evaluate",
        "--load",
        str(where / "ckpt"),
        "--every-iteration",
        "--out",
        str(where / "eval"),
        "--num-tokens",
        str(spec.eval_tokens),
        "--sample-tokens",
        str(spec.metrics_tokens),
    ]


def _steps_done(log: Path) -> int:
    if not log.is_file():
        return 0
    return sum(1 for line in log.read_text().splitlines() if '"lm loss"' in line)


class Progress:
    """One status line: runs done of all, and the running runs' steps. The runs' threads change
    ``running`` and ``done`` under ``lock``; the line is built from a snapshot taken under it (the
    logs are read outside it) and written under it, so lines from two threads never interleave."""

    def __init__(self, total: int, done: int, steps: int):
        self.total, self.done, self.steps = total, done, steps
        self.running: dict[str, Path] = {}
        self.lock = threading.Lock()

    def line(self) -> str:
        with self.lock:
            running, done = list(self.running.items()), self.done
        parts = [f"{name} step {_steps_done(where / 'log.jsonl')}/{self.steps}" for name, where in running]
        return f"study: {done}/{self.total} runs done" + (f"; {', '.join(parts)}" if parts else "")

    def show(self) -> None:
        line = self.line()
        with self.lock:
            sys.stdout.write("\r" + line.ljust(100) if sys.stdout.isatty() else line + "\n")
            sys.stdout.flush()


def _trained(where: Path) -> bool:
    return (where / "trained.json").is_file() or (where / "done.json").is_file()


def _unevaluated(where: Path) -> list[int]:
    from megatron_moe_reg.analysis.evaluate import saved_iterations

    return [i for i in saved_iterations(str(where / "ckpt")) if not (where / "eval" / f"iter_{i:07d}.json").is_file()]


def _adapt_cmd(spec: StudySpec, seed: int, where: Path) -> list[str]:
    options = [item for key, value in spec.adapt.items() for item in (f"--{key}", value)]
    cmd = [sys.executable, "-m", "megatron_moe_reg.cli", "adapt", "--load", str(where / "ckpt")]
    return [*cmd, "--out", str(where / "adapt"), "--seed", str(seed), *options]


def _adapted(spec: StudySpec, where: Path) -> bool:
    return not spec.adapt or (where / "adapt" / "adapt.json").is_file()


def complete(spec: StudySpec, out: Path, variant: str, seed: int) -> bool:
    """Trained, every checkpoint it saved evaluated, and adapted when the study adapts."""
    where = run_dir(out, variant, seed)
    done = (where / "done.json").is_file() and (where / "eval").is_dir()
    return done and not _unevaluated(where) and _adapted(spec, where)


def _stage(cmd: list[str], where: Path, log_name: str, name: str, threads: int, progress: Progress) -> float:
    started = time.time()
    with open(where / log_name, "a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(threads))
        while proc.poll() is None:
            time.sleep(2)
            if sys.stdout.isatty():
                progress.show()
    if proc.returncode != 0:
        tail = (where / log_name).read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise RunStopped(f"study run {name} failed (exit {proc.returncode}): {tail[0]}; see {where / log_name}")
    return time.time() - started


def _run_one(spec, variant, seed, out, threads, progress: Progress) -> None:
    """Pretrain (unless trained), evaluate the checkpoints not yet evaluated, mark done."""
    where = run_dir(out, variant, seed)
    where.mkdir(parents=True, exist_ok=True)
    name = f"{variant}/seed{seed}"
    done = where / "done.json"
    seconds = json.loads(done.read_text())["seconds"] if done.is_file() else 0.0
    with progress.lock:
        progress.running[name] = where
    try:
        if not _trained(where):
            seconds += _stage(_pretrain_cmd(spec, variant, seed, where), where, "pretrain.log", name, threads, progress)
            (where / "trained.json").write_text(json.dumps({"seconds": seconds}))
        if _unevaluated(where):
            seconds += _stage(_eval_cmd(spec, where), where, "eval.log", name, threads, progress)
        if not _adapted(spec, where):
            seconds += _stage(_adapt_cmd(spec, seed, where), where, "adapt.log", name, threads, progress)
        final = max((where / "eval").glob("iter_*.json"))
        (where / "eval.json").write_text(final.read_text())
        done.write_text(json.dumps({"seconds": seconds}))
    finally:
        with progress.lock:
            progress.running.pop(name, None)
            progress.done += complete(spec, out, variant, seed)
        progress.show()


def estimate_seconds(spec: StudySpec, out: Path) -> tuple[float, str]:
    """Wall time of the runs not done yet: from the study's finished runs, else a throughput hint."""
    todo = [r for r in spec.runs() if not complete(spec, out, *r)]
    measured = [json.loads(p.read_text())["seconds"] for p in out.glob("runs/*/*/done.json")]
    if measured:
        return len(todo) * sum(measured) / len(measured), f"from {len(measured)} finished run(s)"
    cfg = parse_variant(spec, spec.baseline)
    tokens = cfg.train.train_iters * cfg.global_batch_size * cfg.model.seq_length
    hint = (
        f"at {TOKENS_PER_SECOND_HINT} tokens/s and {RUN_OVERHEAD_SECONDS_HINT} s per run to start and evaluate "
        "(examples/tiny_cpu.toml on 2 CPU cores; larger models are slower)"
    )
    return len(todo) * (tokens / TOKENS_PER_SECOND_HINT + RUN_OVERHEAD_SECONDS_HINT), hint


def pinned(spec: StudySpec) -> dict:
    """What a study's finished runs depend on; seeds and variants may be added later."""
    return {
        "base": spec.base,
        "variants": spec.variants,
        "adapt": spec.adapt,
        "eval_tokens": spec.eval_tokens,
        "metrics_tokens": spec.metrics_tokens,
    }


def check_pinned(spec: StudySpec, out: Path) -> None:
    """A study directory keeps the spec it was started with (``study.json``); resuming it with a spec
    that changes the base, a variant's flags, the adapt options or the evaluation tokens would mix
    runs of two configurations: a one-line error. Added seeds and variants are fine."""
    path = out / "study.json"
    if not path.is_file():
        return
    before, now = json.loads(path.read_text()), pinned(spec)
    names = {"base": "base", "adapt": "[adapt]", "eval_tokens": "eval-tokens", "metrics_tokens": "metrics-tokens"}
    changed = [names[k] for k in names if before.get(k) != now[k]]
    changed += [f"variant {v!r}" for v, flags in before["variants"].items() if now["variants"].get(v, flags) != flags]
    if changed:
        raise ConfigError(
            f"--out {out}: the study there was started with another {', '.join(changed)} ({path}); "
            "restore the spec or give a new --out"
        )


def _pin(spec: StudySpec, out: Path) -> None:
    path = out / "study.json"
    state = pinned(spec)
    if path.is_file():  # keep variants no longer in the spec: their runs are still there
        state["variants"] = {**json.loads(path.read_text())["variants"], **state["variants"]}
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state, indent=1))


def run_study(spec: StudySpec, out: Path, parallel: int = 1, dry_run: bool = False) -> None:
    check_pinned(spec, out)
    runs = spec.runs()
    todo = [r for r in runs if not complete(spec, out, *r)]
    if dry_run:
        for variant, seed in runs:
            state = "done" if (variant, seed) not in todo else "to run"
            print(f"{variant}/seed{seed} ({state}): moe-reg pretrain {' '.join(spec.flags(variant, seed))}")
        seconds, how = estimate_seconds(spec, out)
        print(f"study: {len(todo)} of {len(runs)} runs to go, about {seconds / 60:.0f} min with --parallel 1 ({how})")
        return
    _pin(spec, out)
    threads = max(1, (os.cpu_count() or 1) // parallel)
    steps = parse_variant(spec, spec.baseline).train.train_iters
    progress = Progress(len(runs), len(runs) - len(todo), steps)
    progress.show()
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        for future in [pool.submit(_run_one, spec, v, s, out, threads, progress) for v, s in todo]:
            future.result()
    if sys.stdout.isatty():
        sys.stdout.write("\n")
