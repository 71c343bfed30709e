"""Megatron-LM's own ``pretrain()`` with the plugin, two ways in, one behaviour:

- from a Megatron-LM checkout (tags ``core_v0.16.x`` to ``core_v0.19.x``):
  ``patches/pretrain_gpt_moe_reg.py`` runs the checkout's ``pretrain_gpt.py`` as its ``__main__``,
  exactly as ``python pretrain_gpt.py`` would (``run_checkout``);
- without a checkout, where megatron-core ships ``megatron.training`` (0.19+ wheels):
  ``moe-reg megatron-lm`` runs ``pretrain()`` with the plugin's dataset provider and forward step
  (``gpt``: Megatron indexed datasets and mock data; ``main``).

Both take the plugin's flags off the command line, print the megatron-core in use (version and
path, and a note when it is not the installed distribution), refuse an unsupported one, adapt the
command line to the machine (``machine_flags``), and run with the rows of the patch table of scopes
``megatron-lm`` (and ``megatron-lm-cpu`` without CUDA) in place.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import os
import runpy
import sys
import time
from collections.abc import Callable
from pathlib import Path

from megatron_moe_reg.errors import ConfigError
from megatron_moe_reg.integration.megatron import fusion_kernels

_PROGRAM_START = time.time()


def _print0(line: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(line, flush=True)


def _given(argv: list[str]) -> set[str]:
    return {item.split("=", 1)[0] for item in argv if item.startswith("--")}


def _value(argv: list[str], flag: str) -> str | None:
    """The last value given to ``flag`` (``--flag VALUE`` or ``--flag=VALUE``), None if not given."""
    value = None
    for i, item in enumerate(argv):
        if item == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif item.startswith(flag + "="):
            value = item.split("=", 1)[1]
    return value


def machine_flags(
    argv: list[str], cuda: bool, importable: Callable[[str], bool] = fusion_kernels.importable
) -> tuple[list[str], str]:
    """Megatron-LM's command line for this machine, and a note of what was added: without CUDA the
    gloo backend; without TransformerEngine the local layer spec; and every fusion whose kernels
    (TransformerEngine or Apex) cannot be imported, turned off. Flags the user gave are kept."""
    given, added = _given(argv), []
    if not cuda and "--distributed-backend" not in given:
        added += ["--distributed-backend", "gloo"]
    te = importable("transformer_engine")
    if not te and "--transformer-impl" not in given:
        added += ["--transformer-impl", "local"]
    te_layers = te and _value(argv, "--transformer-impl") in (None, "transformer_engine")
    for fusion in fusion_kernels.fusions_without_kernels(te_layers, importable):
        if fusion.flag not in given:
            added.append(fusion.flag)
    if not added:
        return argv, ""
    why = "no GPU, " if not cuda else ""
    return argv + added, f"moe-reg: {why}TransformerEngine / Apex kernels missing here: added {' '.join(added)}"


def megatron_core_in_use() -> str:
    """One line: the megatron-core version and path in use, and the installed distribution when
    another copy (a checkout's ``megatron/core``, a ``PYTHONPATH`` entry) shadows it."""
    import megatron.core
    from megatron.core import package_info

    path = Path(megatron.core.__file__).resolve().parent
    line = f"moe-reg: megatron-core {package_info.__version__} from {path}"
    try:
        dist = importlib.metadata.distribution("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        return line
    installed = Path(str(dist.locate_file("megatron/core"))).resolve()
    if installed != path:
        line += f" (not the installed megatron-core {dist.version} at {installed})"
    return line


def _megatron_lm_patches(state, stack: contextlib.ExitStack, sources: tuple[str, ...]) -> None:
    from megatron.training import get_tensorboard_writer, get_wandb_writer, print_rank_last

    from megatron_moe_reg.integration.megatron import patches

    replacements = {
        "megatron-lm.block-spec": state.block_spec_function,
        "megatron-lm.block-spec-builder": state.block_spec_function,
        "megatron-lm.setup_model": state.setup_model_function,
        "megatron-lm.train_step": lambda original: state.train_step_function(
            original, lambda: (get_tensorboard_writer(), get_wandb_writer()), print_rank_last
        ),
    }
    for row in patches.rows("megatron-lm"):
        if row.source in sources:
            value = replacements.get(row.key) or row.make
            assert value is not None, f"no replacement for patch row {row.key}"
            stack.enter_context(patches.replaced(row.key, value))


def _run(argv: list[str] | None, script: str, run: Callable[[], object], sources: tuple[str, ...]) -> int:
    import torch

    from megatron_moe_reg.integration.megatron import compat, cpu_runtime, patches
    from megatron_moe_reg.integration.megatron_lm.plugin import MegatronLMPlugin, split_plugin_flags

    plugin, megatron_argv = split_plugin_flags(list(sys.argv[1:] if argv is None else argv))
    _print0(megatron_core_in_use())
    compat.check_version()
    patches.fix_megatron_core()  # on any machine
    if "--save" in _given(megatron_argv):
        patches.prepare_checkpoint_writer()  # the writer's helper server ends with this rank
    cuda = torch.cuda.is_available()
    megatron_argv, note = machine_flags(megatron_argv, cuda)
    if note:
        _print0(note)
    if not cuda:
        cpu_runtime.activate()
        patches.apply_scope("megatron-lm-cpu", sources)
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    from megatron.training import get_args, print_rank_0

    state = MegatronLMPlugin(plugin, get_args, log=print_rank_0)
    sys.argv = [script, *megatron_argv]
    with contextlib.ExitStack() as stack:
        _megatron_lm_patches(state, stack, sources)
        run()
    return 0


def run_checkout(argv: list[str] | None = None, checkout: str | None = None) -> int:
    """``pretrain_gpt.py`` of the Megatron-LM checkout ``checkout`` (default: the working directory)
    run as ``__main__`` with the plugin; ``argv``: its flags and the plugin's."""
    root = Path(checkout or os.getcwd()).resolve()
    script = root / "pretrain_gpt.py"
    if not script.is_file():
        raise ConfigError(f"no pretrain_gpt.py in {root}; run this from the root of a Megatron-LM checkout")
    sys.path.insert(0, str(root))  # what Python does for pretrain_gpt.py itself: the checkout comes first
    return _run(
        argv,
        str(script),
        lambda: runpy.run_path(str(script), run_name="__main__"),
        ("megatron-core", "megatron-lm", "megatron-lm-checkout"),
    )


def main(argv: list[str] | None = None) -> int:
    """``moe-reg megatron-lm <Megatron-LM flags> <plugin flags>``: Megatron-LM's ``pretrain()`` from the
    installed megatron-core's ``megatron.training`` (0.19+), without a checkout."""
    from megatron.core import package_info
    from packaging.version import Version

    from megatron_moe_reg.integration.megatron_lm.plugin import split_plugin_flags

    split_plugin_flags(list(sys.argv[1:] if argv is None else argv))  # a bad plugin flag is named first
    version = Version(package_info.__version__)
    if not fusion_kernels.importable("megatron.training") or version < Version("0.19"):
        raise ConfigError(
            f"megatron-core {version} does not ship megatron.training (0.19+ wheels do); upgrade, or run "
            "patches/pretrain_gpt_moe_reg.py from a Megatron-LM checkout"
        )
    from megatron_moe_reg.integration.megatron_lm import gpt

    return _run(argv, "moe-reg megatron-lm", lambda: gpt.pretrain_gpt(_PROGRAM_START), ("megatron-core", "megatron-lm"))
