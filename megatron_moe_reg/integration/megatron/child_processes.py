"""Helper processes that end with the rank that started them.

megatron-core's torch_dist checkpoint writer keeps its results queue in a ``multiprocessing`` Manager
server (a spawned process) for the life of each rank. A rank killed by a signal (the OOM killer, a
scheduler's SIGKILL) runs no finalizer, and torchrun puts each rank in a session of its own, so the
server was left running on the node. Started here with Linux's ``PR_SET_PDEATHSIG``, it receives
SIGKILL when the thread that started it ends (the rank's main thread, which saves); where ``prctl``
is missing it behaves as megatron-core's own. Standard library only: the spawned server imports this.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
from multiprocessing.managers import SyncManager

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def end_with_parent(parent_pid: int) -> None:
    """In a child: SIGKILL when the parent ends (Linux); exit at once if it already has."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return
    prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if os.getppid() != parent_pid:
        os._exit(0)


def queue_ending_with_parent():
    """A queue proxy of a spawned Manager server that ends with this process (the proxy keeps the
    manager alive)."""
    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(initializer=end_with_parent, initargs=(os.getpid(),))
    return manager.Queue()
