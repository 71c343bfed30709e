"""Megatron's router decision traces in a ``moe-reg pretrain`` run (``--moe-routing-trace-path``,
megatron-core 0.19+'s ``transformer.moe.router_trace``).

The files are Megatron-LM's, written by Megatron's own ``RouterTracer``: per rank
``router_trace_rank{R}.jsonl``, one record per (step, MoE layer, micro-batch) with the experts each
token of the rank was routed to (``top_indices``, [tokens, k]), and the optional sidecars (hidden
states, pre-top-k logits, router weights), so Megatron-LM's ``tools/moe_routing`` scripts read them.
``step`` is the iteration's 0-based index, as in Megatron-LM's loop. Every router is traced, the
plugin's included (they are ``TopKRouter`` subclasses; the eigenbasis routers have no ``weight``
matrix, so no weight sidecar, and the prototype router's ``weight`` holds prototypes it scores by
cosine, not a linear gate).

Where this differs from Megatron-LM's loop, so that a record is one training forward of one
micro-batch of one layer:

- a router call is traced only in training mode with gradients enabled: evaluation is not traced,
  and of a recomputed layer's two router calls only the one with gradients counts (the rule of the
  plugin's own load counts);
- ``layer`` is the router's global 0-based layer index under pipeline parallelism too (Megatron-LM
  reads it from the module name, which numbers each stage's layers from 0);
- a resumed run keeps the earlier run's records of the steps before its checkpoint and appends to
  them (Megatron's tracer truncates the file); a run that starts at iteration 0 does not write over
  an earlier trace, and a trace with sidecars is not continued (``check_trace_dir``).

Tracing reads each record's indices on the host: it adds a host-device synchronization per router
call while it runs. (No torch at import: the options are checked while the flags are parsed.)
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os

from megatron_moe_reg import flags
from megatron_moe_reg.errors import ConfigError

TRACER_MODULE = "megatron.core.transformer.moe.router_trace"
TRACE_OPTIONS = (
    "moe_routing_trace_max_training_iters",
    "moe_routing_trace_capture_logits",
    "moe_routing_trace_capture_hidden_states",
    "moe_routing_trace_dump_weights",
)
SIDECARS = ("hidden_states_rank*.bin", "logits_rank*.bin", "router_state_rank*.pt")


def trace_file(directory: str, rank: int) -> str:
    """The JSON-lines trace of one rank (Megatron's name)."""
    return os.path.join(directory, f"router_trace_rank{rank}.jsonl")


def check_trace_options(log, explicit: frozenset) -> None:
    """The trace flags need ``--moe-routing-trace-path``, megatron-core's tracer and a positive limit."""
    if not log.moe_routing_trace_path:
        given = [name for name in TRACE_OPTIONS if name in explicit and getattr(log, name)]
        if given:
            raise ConfigError(
                f"{flags.flag_name(given[0])} needs --moe-routing-trace-path DIR (the directory of the traces)"
            )
        return
    if importlib.util.find_spec(TRACER_MODULE) is None:
        raise ConfigError(
            "--moe-routing-trace-path needs megatron-core 0.19+ (its router tracer); upgrade megatron-core "
            "or drop the flag (the plugin's routing metrics and 'moe-reg analyze' need no trace)"
        )
    limit = log.moe_routing_trace_max_training_iters
    if limit is not None and limit < 1:
        raise ConfigError(f"--moe-routing-trace-max-training-iters must be >= 1, got {limit}")


def check_trace_dir(directory: str, resumes: bool) -> None:
    """Nothing of an earlier trace in ``directory`` is overwritten: its sidecars are never continued
    (their records' byte offsets cannot be), and its records only by a run that resumes (``resumes``:
    from a checkpoint, keeping the steps before it)."""
    flag = f"--moe-routing-trace-path {directory}"
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ConfigError(f"{flag} is a file; give a directory")
    found = sorted(path for pattern in SIDECARS for path in glob.glob(os.path.join(directory, pattern)))
    if found:
        raise ConfigError(
            f"{flag} holds an earlier trace's {os.path.basename(found[0])}; give a new directory "
            "(a trace with sidecars is not continued, and would be overwritten)"
        )
    traces = sorted(p for p in glob.glob(os.path.join(directory, "router_trace_rank*.jsonl")) if os.path.getsize(p))
    if traces and not resumes:
        raise ConfigError(
            f"{flag} holds an earlier run's {os.path.basename(traces[0])}, which this run, starting at "
            "iteration 0, would overwrite; give a new directory, or resume that run with --load"
        )


def _step_of(line: str) -> int | None:
    """A record's step; None for a line that is not a record (a write cut short by a crash)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _earlier_records(path: str, before_step: int) -> list[str]:
    """The records of an earlier trace whose step precedes ``before_step`` (a resumed run's past)."""
    if before_step <= 0 or not os.path.isfile(path):
        return []
    with open(path) as f:
        kept = [line for line in f if (step := _step_of(line)) is not None and step < before_step]
    return [line if line.endswith("\n") else line + "\n" for line in kept]


def _training_calls_only(hook):
    """The tracer's hook, called for a router call in training mode with gradients enabled."""
    import torch

    def filtered(module, inputs, outputs):
        if module.training and torch.is_grad_enabled():
            hook(module, inputs, outputs)

    return filtered


class RoutingTrace:
    """Megatron's tracer on every router of the model chunks, from iteration ``start`` on."""

    def __init__(self, log, train_iters: int, rank: int, chunks: list, start: int):
        from megatron.core.transformer.moe.router import TopKRouter
        from megatron.core.transformer.moe.router_trace import RouterTracer

        directory = log.moe_routing_trace_path
        kept = _earlier_records(trace_file(directory, rank), start)
        self.tracer = RouterTracer(  # truncates the rank's file: the earlier steps are written back
            directory,
            log.moe_routing_trace_max_training_iters or train_iters,
            rank,
            training_mode=True,
            capture_hidden_states=log.moe_routing_trace_capture_hidden_states,
            capture_logits=log.moe_routing_trace_capture_logits,
            dump_router_weights=log.moe_routing_trace_dump_weights,
        )
        if kept:
            with open(self.tracer.output_path, "w") as f:
                f.writelines(kept)
        self.handles = [
            module.register_forward_hook(
                _training_calls_only(self.tracer.make_hook(f"decoder.layers.{module.layer_number - 1}.mlp.router"))
            )
            for chunk in chunks
            for module in chunk.modules()
            if isinstance(module, TopKRouter)
        ]

    def end_step(self, iteration: int) -> None:
        """After training iteration ``iteration`` (1-based): its records go to disk as step
        ``iteration - 1``."""
        self.tracer.advance_step(iteration - 1)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.tracer.flush()


def start_trace(cfg, chunks: list, iteration: int) -> RoutingTrace | None:
    """The run's trace (None without ``--moe-routing-trace-path``), continuing at ``iteration``."""
    if not cfg.log.moe_routing_trace_path:
        return None
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    return RoutingTrace(cfg.log, cfg.train.train_iters, rank, chunks, iteration)
