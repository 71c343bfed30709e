"""Host-device synchronizing calls made by the plugin's own code during a training step.

A ``TorchFunctionMode`` sees every tensor call; a call counts when it reads device data on the
host (``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``, ``bool/int/float(tensor)``), has an
output size that depends on the data (``nonzero``, ``masked_select``, ``unique``, ``bincount``,
``repeat_interleave`` without ``output_size``, indexing with a boolean mask), and the innermost
Python frame outside torch belongs to the plugin (``megatron_moe_reg/`` except the trainer loop in
``training/``, which follows Megatron-LM's own per-step reads, and the CPU stand-ins of Megatron's
CUDA calls). Megatron's own synchronizations (its dispatcher's split sizes, the optimizer's
gradient norm) are Megatron's.

Run as a script (``torchrun ... tests/sync_watch.py OUT FLAGS...``): builds a model from the
``moe-reg pretrain`` flags, runs one warm-up step and then one non-log step under the watch, and
writes ``OUT/sync_calls.json``: rank 0's offending calls with their plugin frame, and those of a
log step's report (a positive control: it reads values on the host).
"""

from __future__ import annotations

import json
import sys
import traceback
import warnings
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

PACKAGE = str(Path(__file__).resolve().parents[1] / "megatron_moe_reg")
# the trainer loop, and the CPU stand-ins of Megatron's own CUDA calls (its dispatcher's copy of
# split sizes to the host is Megatron's synchronization, made by our stand-in only on CPU)
EXEMPT = (PACKAGE + "/training/", PACKAGE + "/integration/megatron/host_device.py")
READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"}
DATA_SIZED = {"nonzero", "masked_select", "unique", "unique_consecutive", "bincount", "argwhere"}


def _bool_index(args) -> bool:
    index = args[1] if len(args) > 1 else None
    items = index if isinstance(index, tuple) else (index,)
    return any(torch.is_tensor(i) and i.dtype == torch.bool for i in items)


def _syncs(name: str, args, kwargs) -> bool:
    if name in READS or name in DATA_SIZED:
        return True
    if name == "repeat_interleave":
        return torch.is_tensor(args[1] if len(args) > 1 else kwargs.get("repeats")) and "output_size" not in kwargs
    if name in ("__getitem__", "__setitem__", "index_put", "index_put_"):
        return _bool_index(args)
    return False


def _plugin_frame() -> str | None:
    """The innermost frame outside torch and this file, when it is the plugin's (not exempt)."""
    for frame in reversed(traceback.extract_stack()):
        name = frame.filename
        if name == __file__ or "/torch/" in name:
            continue
        if name.startswith(PACKAGE) and not name.startswith(EXEMPT):
            return f"{name[len(PACKAGE) - len('megatron_moe_reg'):]}:{frame.lineno} {frame.line}"
        return None
    return None


class SyncWatch(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if _syncs(name, args, kwargs):
            where = _plugin_frame()
            if where is not None:
                self.calls.append(f"{name} at {where}")
        return func(*args, **kwargs)


def main(out: str, flags: list[str]) -> None:
    import torch.distributed as dist

    from megatron_moe_reg.errors import quiet_third_party_warnings
    from megatron_moe_reg.training import trainer
    from megatron_moe_reg.training.arguments import parse_args
    from megatron_moe_reg.training.data import make_loader
    from megatron_moe_reg.training.step import train_step

    quiet_third_party_warnings()
    world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
    cfg = parse_args(flags, world_size=world)
    ctx = trainer.setup(cfg)
    data = iter(make_loader(ctx.datasets[0], cfg))
    regs = ctx.regularizers
    log = cfg.log.log_interval
    assert log > 2, "the watched step must not be a log step"
    regs.begin_step(1)
    train_step(ctx, data)
    regs.finish_step(1, None)
    watch = SyncWatch()
    on_gpu = torch.cuda.is_available()
    if on_gpu:  # CUDA's own detector too: its warnings name the Python line that synchronized
        torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught, watch:
        warnings.simplefilter("always")
        plan = regs.begin_step(2)
        train_step(ctx, data)
        regs.finish_step(2, None)
    if on_gpu:
        torch.cuda.set_sync_debug_mode(0)
    cuda_calls = [f"{w.filename}:{w.lineno} {w.message}" for w in caught
                  if "synchroniz" in str(w.message) and w.filename.startswith(PACKAGE)
                  and not w.filename.startswith(EXEMPT)]
    assert not (plan.log or plan.measure), "the watched step must be a non-log step"
    control = SyncWatch()  # a log step's report reads values on the host: the watch must see it
    with control:
        regs.tracker.report(["specialization_loss"], regs.num_layers, 2)
    if dist.get_rank() == 0:
        Path(out).mkdir(parents=True, exist_ok=True)
        result = {"calls": watch.calls, "control": control.calls, "cuda_calls": cuda_calls}
        (Path(out) / "sync_calls.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
