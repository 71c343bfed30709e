"""``moe-reg pretrain`` fitted to the machine: Megatron-LM's fusions (its flags and defaults, all on),
turned off with one note where the machine lacks their kernels, one-line errors where a flag asks for
one that cannot run, the TransformerConfig they give; and CUDA_DEVICE_MAX_CONNECTIONS for tensor
parallelism on a GPU. Machines other than this one are described to ``fit_to_machine`` by whether
they have CUDA and which modules they can import."""

import os

import pytest

from megatron_moe_reg.errors import ConfigError
from megatron_moe_reg.integration.megatron_lm.entry import machine_flags
from megatron_moe_reg.training.arguments import build_parser, fit_to_machine, parse_args, run_config_from_values
from megatron_moe_reg.training.model import transformer_config

from helpers import PARSE_BASE

GPU_STYLE = ["--swiglu", "--disable-bias-linear", "--position-embedding-type", "rope"]


def unfitted(argv):
    """The run configuration of ``argv`` before it is fitted to a machine."""
    values = vars(build_parser().parse_args(argv))
    return run_config_from_values(values, 1, command_line=frozenset(values))


def only(*names):
    return lambda name: name in names


def fusions(cfg):
    f = cfg.fusion
    return {"softmax": f.masked_softmax_fusion, "swiglu": f.bias_swiglu_fusion, "gelu": f.bias_gelu_fusion,
            "dropout": f.bias_dropout_fusion, "rope": f.apply_rope_fusion,
            "grad_accum": f.gradient_accumulation_fusion, "persist_ln": not f.no_persist_layer_norm}


def test_the_flags_are_megatron_lms_and_every_fusion_is_on_by_default():
    cfg = unfitted(["--mock-data"])
    assert all(fusions(cfg).values())
    off = unfitted(["--no-masked-softmax-fusion", "--no-bias-gelu-fusion", "--no-bias-swiglu-fusion",
                    "--no-bias-dropout-fusion", "--no-rope-fusion", "--no-gradient-accumulation-fusion",
                    "--no-persist-layer-norm"])
    assert not any(fusions(off).values())


def test_a_gpu_without_apex_or_te_keeps_only_the_compiled_fusions():
    """The GPU check's machine: CUDA, no Apex, no TransformerEngine. megatron-core's local attention
    would import Apex's scaled_masked_softmax_cuda in its first bf16 step."""
    cfg = unfitted(GPU_STYLE)
    fit_to_machine(cfg, cuda=True, can_import=only())
    assert cfg.model.transformer_impl == "local"
    assert fusions(cfg) == {"softmax": False, "swiglu": True, "gelu": False, "dropout": True, "rope": False,
                            "grad_accum": False, "persist_ln": False}
    assert cfg.machine_notes[-1] == ("no Apex / TransformerEngine kernels here: --no-rope-fusion "
                                     "--no-persist-layer-norm --no-gradient-accumulation-fusion "
                                     "--no-masked-softmax-fusion")
    # Megatron-LM's own entry turns off the same kernel fusions on that machine
    added, _ = machine_flags(GPU_STYLE, cuda=True, importable=only())
    assert set(cfg.machine_notes[-1].split(": ")[1].split()) == {a for a in added if a.endswith(("fusion", "norm"))}


def test_te_layers_keep_their_own_softmax_and_rope_and_apex_brings_the_rest():
    te = unfitted(GPU_STYLE)
    fit_to_machine(te, cuda=True, can_import=only("transformer_engine"))
    assert te.model.transformer_impl == "transformer_engine"
    assert fusions(te) == {"softmax": True, "swiglu": True, "gelu": False, "dropout": True, "rope": True,
                           "grad_accum": False, "persist_ln": False}
    local = unfitted([*GPU_STYLE, "--transformer-impl", "local"])  # TE installed, its layers not used
    fit_to_machine(local, cuda=True, can_import=only("transformer_engine"))
    assert not local.fusion.masked_softmax_fusion and local.fusion.apply_rope_fusion
    full = unfitted(GPU_STYLE)
    fit_to_machine(full, cuda=True, can_import=lambda name: True)
    assert all(v for k, v in fusions(full).items() if k != "gelu") and not full.machine_notes
    gelu = unfitted(["--position-embedding-type", "rope"])  # GELU with biases: Megatron-LM fuses it
    fit_to_machine(gelu, cuda=True, can_import=lambda name: True)
    assert gelu.fusion.bias_gelu_fusion


def test_without_a_gpu_every_fusion_is_off_unless_a_compiled_one_is_asked_for():
    cfg = parse_args([*PARSE_BASE, "--bias-dropout-fusion"], world_size=1)
    assert fusions(cfg) == {"softmax": False, "swiglu": False, "gelu": False, "dropout": True, "rope": False,
                            "grad_accum": False, "persist_ln": False}
    assert cfg.machine_notes[-1] == ("no GPU here: --no-rope-fusion --no-persist-layer-norm "
                                     "--no-gradient-accumulation-fusion --no-masked-softmax-fusion "
                                     "--no-bias-swiglu-fusion")
    config = transformer_config(cfg, use_te=False)
    assert config.bias_dropout_fusion and not config.masked_softmax_fusion and not config.bias_activation_fusion
    asked = parse_args([*PARSE_BASE, "--bias-swiglu-fusion"], world_size=1)
    assert transformer_config(asked, use_te=False).bias_activation_fusion  # SwiGLU's, with --swiglu
    gelu = [*PARSE_BASE, "--no-swiglu", "--bias-gelu-fusion", "--no-bias-swiglu-fusion"]
    assert not transformer_config(parse_args(gelu, world_size=1), use_te=False).bias_activation_fusion  # no bias
    with_bias = parse_args([*gelu, "--add-bias-linear"], world_size=1)
    assert transformer_config(with_bias, use_te=False).bias_activation_fusion  # GELU's, with biases


@pytest.mark.parametrize("flag, message", [
    ("--masked-softmax-fusion", "--masked-softmax-fusion needs Apex's CUDA extensions (scaled_masked_softmax_cuda) "
     "or TransformerEngine layers on a GPU; there is no GPU here: use --no-masked-softmax-fusion"),
    ("--gradient-accumulation-fusion", "use --no-gradient-accumulation-fusion"),
    ("--rope-fusion", "--rope-fusion needs TransformerEngine on a GPU; there is no GPU here: use --no-rope-fusion"),
])
def test_a_fusion_asked_for_without_its_kernels_stops_with_one_line(flag, message):
    with pytest.raises(ConfigError) as info:
        parse_args([*PARSE_BASE, "--position-embedding-type", "rope", flag], world_size=1)
    assert message in str(info.value) and "\n" not in str(info.value)
    gpu = unfitted([*GPU_STYLE, flag])
    with pytest.raises(ConfigError, match="they are not installed here"):
        fit_to_machine(gpu, cuda=True, can_import=only())


def test_tensor_parallelism_on_a_gpu_gets_one_device_connection_unless_one_is_chosen(monkeypatch):
    """Megatron-LM asserts CUDA_DEVICE_MAX_CONNECTIONS=1 with TP or CP before Blackwell (the TP
    communication is queued ahead of the GEMMs it overlaps); set before CUDA creates its context."""
    tp = [*GPU_STYLE, "--tensor-model-parallel-size", "2", "--sequence-parallel"]
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    cpu = unfitted(tp)
    fit_to_machine(cpu, cuda=False, can_import=only())
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in os.environ
    gpu = unfitted(tp)
    fit_to_machine(gpu, cuda=True, can_import=only())
    assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert gpu.machine_notes[-1].startswith("tensor / context parallelism on a GPU: CUDA_DEVICE_MAX_CONNECTIONS=1")
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "8")
    chosen = unfitted(tp)
    fit_to_machine(chosen, cuda=True, can_import=only())
    assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "8"
    assert not any("CUDA_DEVICE_MAX_CONNECTIONS" in n for n in chosen.machine_notes)
