"""Integration layer: CPU runtime patches, spec swaps (0.16 and 0.17+ styles), SP norm."""

import dataclasses
import functools

import pytest
import torch
from packaging.version import Version

from megatron_moe_reg.integration.megatron import compat, cpu_runtime, patches

pytestmark = pytest.mark.compat

def test_every_patch_row_is_documented_and_finds_its_target():
    """Every row of the one patch table that applies to this megatron-core finds its target, so no
    row silently does nothing: megatron-core's and torch's always, Megatron-LM's ``megatron.training``
    where this megatron-core ships it (0.19+ wheels). (The rows on a checkout's scripts are applied,
    and so resolved, by tests/test_megatron_lm_loop.py with MEGATRON_LM_PATH.)"""
    assert cpu_runtime.activate() is (not torch.cuda.is_available())
    for patch in patches.PATCHES:
        scopes = ("cpu", "megatron-core", "megatron-lm", "megatron-lm-cpu", "training", "routing", "data",
                  "compat", "checkpoint")
        assert patch.reason and patch.versions and patch.scope in scopes, patch.key
        assert patch.kind in ("replace", "define", "mutate") and patch.source in patches.SOURCES, patch.key
    sources = ["megatron-core"]
    if patches.installed_version() >= Version("0.19"):
        sources.append("megatron-lm")
    assert patches.unresolved_targets(sources=tuple(sources)) == []
    assert patches.rows("cpu") and all(p.scope == "cpu" for p in patches.rows("cpu"))


def test_a_row_whose_target_is_missing_is_found():
    planted = (patches.Patch("planted", "torch.cuda:no_such_function", "0.16-0.19", "planted", "cpu"),
               patches.Patch("planted-module", "no_such_module:x", "0.16-0.19", "planted", "cpu"),
               patches.Patch("planted-define", "torch:zeros", "0.16-0.19", "planted", "cpu", kind="define"))
    found = patches.unresolved_targets(table=planted)
    assert [line.split(":")[0] for line in found] == ["planted", "planted-module", "planted-define"]
    assert patches.unresolved_targets(Version("0.15.0"), table=planted) == []  # out of range: not checked


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU runtime is inactive with CUDA")
def test_cuda_device_requests_land_on_cpu():
    cpu_runtime.activate()
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.tensor([1.0], device=torch.device("cuda", 0)).device.type == "cpu"
    x = torch.ones(3)
    assert x.cuda() is x and x.to("cuda").device.type == "cpu"
    assert x.type() == "torch.cuda.FloatTensor" and x.bfloat16().type() == "torch.cuda.BFloat16Tensor"
    assert x.type(torch.float64).dtype == torch.float64
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        event = stream.record_event()
    event.synchronize()
    assert torch.cuda.current_stream() is torch.cuda.current_stream()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU runtime is inactive with CUDA")
def test_rng_tracker_forks_named_cpu_states():
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    cpu_runtime.activate()
    tracker = get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("test-rng", 123)
    torch.manual_seed(0)
    outside = torch.rand(2)
    torch.manual_seed(0)
    with tracker.fork("test-rng"):
        a = torch.rand(2)
    assert torch.equal(torch.rand(2), outside)  # the default stream is untouched by the fork
    with tracker.fork("test-rng"):
        b = torch.rand(2)
    torch.manual_seed(123)
    expected = torch.rand(4)
    assert torch.equal(torch.cat([a, b]), expected)  # the named stream continues across forks


def _tiny_config(**overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, num_moe_experts=4,
              moe_ffn_hidden_size=64,
              moe_router_topk=2, moe_layer_freq=[1, 0], normalization="RMSNorm", add_bias_linear=False,
              gated_linear_unit=True, activation_func=torch.nn.functional.silu, use_cpu_initialization=True,
              bias_activation_fusion=False, gradient_accumulation_fusion=False)
    kw.update(overrides)
    return TransformerConfig(**kw)


def test_spec_swaps_router_and_experts_in_moe_layers_only():
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_moe_reg.integration.megatron.spec import gpt_block_spec

    class MarkedRouter(TopKRouter):
        pass

    marker_experts = object()
    spec = gpt_block_spec(_tiny_config(), False, router=compat.router_builder(MarkedRouter), pp_rank=0,
                          experts=marker_experts)
    moe, dense = spec.layer_specs
    assert compat.is_moe_spec(moe.submodules.mlp) and not compat.is_moe_spec(dense.submodules.mlp)
    sub = compat.moe_submodules(moe.submodules.mlp)
    assert sub.router.router_cls is MarkedRouter and sub.experts is marker_experts
    untouched = gpt_block_spec(_tiny_config(), False, pp_rank=0)
    assert compat.moe_submodules(untouched.layer_specs[0].submodules.mlp).router is TopKRouter


@pytest.mark.compat
def test_grouped_backend_swaps_sequential_mlp_keeping_its_submodules():
    from megatron.core.transformer.moe.experts import SequentialMLP

    from megatron_moe_reg.experts.grouped_experts import GroupedGemmExperts
    from megatron_moe_reg.integration.megatron.spec import gpt_block_spec

    def experts_of(spec):
        experts = compat.moe_submodules(spec.layer_specs[0].submodules.mlp).experts
        if isinstance(experts, functools.partial):  # 0.17+
            return experts.func, experts.keywords["submodules"], experts.keywords.get("backend")
        return experts.module, experts.submodules, experts.params.get("backend")

    plain_cls, plain_sub, _ = experts_of(gpt_block_spec(_tiny_config(), False, pp_rank=0))
    cls, sub, backend = experts_of(gpt_block_spec(_tiny_config(), False, pp_rank=0, grouped_backend="triton"))
    assert plain_cls is SequentialMLP and cls is GroupedGemmExperts and backend == "triton"
    assert sub == plain_sub


def test_partial_style_specs_are_rewritten_too():
    """megatron-core 0.17+ builds MoE specs as functools.partial(MoELayer, submodules=...)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules

    original = functools.partial(MoELayer, submodules=MoESubmodules(experts="E", shared_experts="S"), name="x")
    assert compat.is_moe_spec(original)
    new = compat.replace_moe_submodules(original, router="R")
    assert isinstance(new, functools.partial) and new.func is MoELayer and new.keywords["name"] == "x"
    assert compat.moe_submodules(new) == MoESubmodules(experts="E", shared_experts="S", router="R")
    assert compat.moe_submodules(original).router != "R"  # the original is not mutated
    assert not compat.is_moe_spec(functools.partial(dict))


def test_router_builder_accepts_every_versions_keywords():
    seen = {}

    class Probe:
        def __init__(self, config, pg_collection=None, **kwargs):
            seen.update(config=config, pg_collection=pg_collection, **kwargs)

    build = compat.router_builder(Probe, extra=1)
    build(config="C", pg_collection="P")  # 0.16
    build(config="C", pg_collection="P", is_mtp_layer=True)  # 0.17+
    assert seen == {"config": "C", "pg_collection": "P", "extra": 1, "is_mtp_layer": True}


def test_sequence_parallel_norm_is_tagged_for_tp_reduction():
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from megatron_moe_reg.integration.megatron.norms import SequenceParallelTorchNorm
    from megatron_moe_reg.integration.megatron.spec import gpt_block_spec

    cfg = _tiny_config(sequence_parallel=True, tensor_model_parallel_size=2)
    with pytest.raises(AssertionError):
        WrappedTorchNorm(cfg, 32)  # Megatron's torch norm refuses sequence parallelism
    norm = SequenceParallelTorchNorm(cfg, 32, eps=1e-6)
    assert isinstance(norm, torch.nn.RMSNorm) and norm.weight.sequence_parallel is True
    x = torch.randn(3, 32)
    assert torch.allclose(norm(x), torch.nn.RMSNorm(32, eps=1e-6)(x))
    spec = gpt_block_spec(cfg, False, pp_rank=0)
    assert spec.layer_norm is SequenceParallelTorchNorm
    for layer in spec.layer_specs:
        assert layer.submodules.input_layernorm is SequenceParallelTorchNorm
        assert layer.submodules.pre_mlp_layernorm is SequenceParallelTorchNorm
    plain = gpt_block_spec(_tiny_config(), False, pp_rank=0)
    assert plain.layer_specs[0].submodules.input_layernorm is WrappedTorchNorm


def test_version_is_supported():
    compat.check_version()
    assert compat.SUPPORTED[0] <= compat.MCORE_VERSION < compat.SUPPORTED[1]
    assert dataclasses.is_dataclass(compat.moe_submodules(
        __import__("megatron_moe_reg.integration.megatron.spec", fromlist=["x"]).gpt_block_spec(
            _tiny_config(), False, pp_rank=0).layer_specs[0].submodules.mlp))


@pytest.mark.skipif(compat.MCORE_VERSION >= Version("0.17"), reason="0.17+ defines te_general_gemm without TE")
def test_megatron_cores_own_fixes_apply_without_the_cpu_runtime():
    """0.16's router gating names te_general_gemm, defined only when TransformerEngine imports: every
    TopKRouter fails without TE on any machine, GPU too. The fix is applied by both drivers whatever
    the machine (scope megatron-core); here in a fresh process that never activates the CPU runtime."""
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from megatron.core.transformer.moe.moe_utils import router_gating_linear\n"
        "x, w = torch.ones(3, 4), torch.ones(2, 4)\n"
        "try:\n"
        "    router_gating_linear(x, w, None, torch.float32)\n"
        "except NameError as e:\n"
        "    print('unfixed:', e)\n"
        "from megatron_moe_reg.integration.megatron import cpu_runtime, patches\n"
        "assert patches.fix_megatron_core() == 1 and patches.fix_megatron_core() == 0\n"
        "print('fixed:', router_gating_linear(x, w, None, torch.float32).sum().item(), cpu_runtime.is_active())\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.splitlines() == ["unfixed: name 'te_general_gemm' is not defined", "fixed: 24.0 False"]
