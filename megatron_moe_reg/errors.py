"""Bad user input: one exception type, reported as a single line; commands run guarded by it.

No torch, no Megatron: the command-line entries use this before anything heavy is imported.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable


class ConfigError(ValueError):
    """Invalid configuration. The message names the flag and the fix."""


class RunStopped(RuntimeError):
    """A run stopped on purpose (a non-finite gradient norm, non-finite weights at a save). The message
    names the iteration, the quantity and the last good checkpoint."""


def run_guarded(fn: Callable[[list[str]], int | None], argv: list[str]) -> int:
    """Run a command; configuration errors become one line on stderr (rank 0) and exit status 2, a
    stopped run one line and exit status 1."""
    rank0 = os.environ.get("RANK", "0") == "0"
    try:
        return fn(argv) or 0
    except ConfigError as e:
        if rank0:
            sys.stderr.write(f"moe-reg: error: {e}\n")
        return 2
    except RunStopped as e:
        if rank0:
            sys.stderr.write(f"moe-reg: stopped: {e}\n")
        return 1


def quiet_third_party_warnings() -> None:
    """Warnings megatron-core and torch print on every rank that say nothing about the run."""
    warnings.filterwarnings("ignore", message="Apex is not installed")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    warnings.filterwarnings("ignore", message=".*is deprecated. Please use `torch.distributed")
    warnings.filterwarnings("ignore", message="full scope is deprecated")
    warnings.filterwarnings("ignore", message="`load_state_dict` is deprecated")
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    warnings.filterwarnings("ignore", message="Only transformer-engine>=")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
