"""Megatron-LM's fusions on this machine: on by default as in Megatron-LM, off (with one note) where
they cannot run, an error where a flag asks for one that cannot.

- Megatron-LM's own adjustments, silent there and here: no bias-GELU fusion without biases, no RoPE
  fusion without RoPE.
- Fusions whose kernels are not PyTorch's (``integration.megatron.fusion_kernels``): off without
  CUDA, and on a GPU without Apex / TransformerEngine. megatron-core would otherwise stop in the first
  step (the softmax) or while building the model (the gradient-accumulation GEMM).
- Fusions that megatron-core writes as ``torch.compile``'d functions (bias + GELU / SwiGLU, bias +
  dropout + add): off without CUDA, where compiling them costs more than it saves; given explicitly
  they stay (they run on CPU too).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from megatron_moe_reg.errors import ConfigError
from megatron_moe_reg.flags import flag_name
from megatron_moe_reg.integration.megatron.fusion_kernels import fusions_without_kernels

if TYPE_CHECKING:
    from megatron_moe_reg.training.arguments import RunConfig

COMPILED_FUSIONS = ("bias_gelu_fusion", "bias_swiglu_fusion", "bias_dropout_fusion")  # FusionArgs fields


def _field(dest: str) -> tuple[str, bool]:
    """The FusionArgs field of a Megatron fusion, and the value that turns it off (Megatron-LM's
    ``--no-persist-layer-norm`` stores ``no_persist_layer_norm``)."""
    return ("no_persist_layer_norm", True) if dest == "persist_layer_norm" else (dest, False)


def _nothing(name: str) -> bool:
    return False


def fit_fusions(cfg: RunConfig, cuda: bool, te_layers: bool, can_import: Callable[[str], bool]) -> list[str]:
    """Turn off, in ``cfg.fusion``, the fusions this machine cannot run; return the notes saying so."""
    f, m = cfg.fusion, cfg.model
    if not m.add_bias_linear:  # Megatron-LM's validate_args
        f.bias_gelu_fusion = False
    if m.position_embedding_type != "rope":
        f.apply_rope_fusion = False
    unused = "bias_gelu_fusion" if m.swiglu else "bias_swiglu_fusion"  # the other activation's
    off = []  # without CUDA no kernel is usable, whatever imports
    for kernel in fusions_without_kernels(te_layers, can_import if cuda else _nothing):
        name, off_value = _field(kernel.dest)
        if getattr(f, name) == off_value:
            continue
        if name in cfg.explicit:
            flag = kernel.flag.replace("--no-", "--", 1)
            why = "there is no GPU here" if not cuda else "they are not installed here"
            raise ConfigError(f"{flag} needs {kernel.needs} on a GPU; {why}: use {kernel.flag}")
        setattr(f, name, off_value)
        off.append(kernel.flag)
    if not cuda:
        for name in COMPILED_FUSIONS:
            if name != unused and getattr(f, name) and name not in cfg.explicit:
                setattr(f, name, False)
                off.append("--no-" + flag_name(name)[2:])
    if not off:
        return []
    where = "no GPU here" if not cuda else "no Apex / TransformerEngine kernels here"
    return [f"{where}: {' '.join(off)}"]
