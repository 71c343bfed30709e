"""Stopping early on purpose, as Megatron-LM does: ``--exit-signal-handler`` (SIGTERM, which Slurm sends
before a preemption or at the time limit, and torchrun forwards to its workers) and
``--exit-duration-in-mins``. Either makes the loop save and return after the current step.

Every rank must stop at the same step: with either option on, each step ends with one all-reduce (MAX)
of (signal received, minutes elapsed), Megatron-LM's cost for the same options; with both off, nothing.
"""

from __future__ import annotations

import signal
import time

import torch
import torch.distributed as dist


class EarlyExit:
    def __init__(self, handle_signal: bool, minutes: int | None, device):
        self.handle_signal, self.minutes, self.device = handle_signal, minutes, device
        self.started = time.time()
        self.received = False
        self._previous = signal.signal(signal.SIGTERM, self._on_signal) if handle_signal else None

    def _on_signal(self, signum, frame) -> None:
        self.received = True

    def reason(self) -> str | None:
        """Why to stop after this step, the same on every rank (collective when an option is on)."""
        if not (self.handle_signal or self.minutes):
            return None
        state = torch.tensor([float(self.received), (time.time() - self.started) / 60.0], device=self.device)
        dist.all_reduce(state, op=dist.ReduceOp.MAX)
        if state[0] > 0:
            return "SIGTERM received (--exit-signal-handler)"
        if self.minutes and state[1] >= self.minutes:
            return f"--exit-duration-in-mins {self.minutes} reached"
        return None

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
