"""The Megatron-LM add-on's pieces, on CPU without a Megatron-LM checkout: its flags and their
validation against Megatron-LM-named run options, the block-spec replacement, and the train-step
wrapper's schedule. (The entry itself needs Megatron-LM and CUDA; see the README.)"""

import argparse
import dataclasses
import sys
import types

import pytest

from megatron_moe_reg.errors import ConfigError
from megatron_moe_reg.integration.install import StepPolicy
from megatron_moe_reg.integration.megatron import compat, patches
from megatron_moe_reg.integration.megatron_lm import MegatronLMPlugin, add_plugin_args, plugin_config
from megatron_moe_reg.training.arguments import parse_args

MOCK = ["--mock-data", "--vocab-size", "512"]


def megatron_lm_namespace(model_flags: list[str], plugin_flags: list[str]) -> argparse.Namespace:
    """A namespace as Megatron-LM's parser leaves it: its options under their Megatron-LM names
    (ours are the same names) plus the add-on's flags parsed by ``add_plugin_args``."""
    run = parse_args(MOCK + model_flags)
    values = {}
    for group in (run.model, run.moe, run.parallel, run.train, run.data, run.log):
        values.update(dataclasses.asdict(group))
    values["world_size"] = run.world_size
    plugin_ns = add_plugin_args(argparse.ArgumentParser()).parse_args(plugin_flags)
    return argparse.Namespace(**values, **vars(plugin_ns), iteration=0)


def test_plugin_flags_are_read_and_validated_against_megatron_lm_options():
    ns = megatron_lm_namespace([], ["--moe-specialization-loss-coeff", "2e-3", "--moe-router-type", "spectral"])
    plugin = plugin_config(ns)
    assert plugin.moe_specialization_loss_coeff == 2e-3 and plugin.moe_router_type == "spectral"
    assert plugin.moe_coupling_loss_coeff == 0.0  # unset flags keep their defaults
    bad = megatron_lm_namespace(["--no-swiglu"], ["--moe-grouped-gemm-backend", "triton"])
    with pytest.raises(ConfigError, match="computes bias-free SwiGLU experts"):
        plugin_config(bad)
    with pytest.raises(SystemExit):  # argparse refuses an unknown choice
        add_plugin_args(argparse.ArgumentParser()).parse_args(["--moe-router-type", "nope"])


@pytest.mark.compat
def test_block_spec_function_swaps_router_and_experts(groups, monkeypatch):
    import torch
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_moe_reg.experts.grouped_experts import GroupedGemmExperts
    from megatron_moe_reg.routers import ROUTERS

    ns = megatron_lm_namespace([], ["--moe-router-type", "ermoe", "--moe-grouped-gemm-backend", "triton"])
    state = MegatronLMPlugin(lambda: ns)
    builders = types.ModuleType("gpt_builders")
    builders.get_gpt_decoder_block_spec = get_gpt_decoder_block_spec
    monkeypatch.setitem(sys.modules, "gpt_builders", builders)  # a checkout's module, for the patch row
    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_moe_experts=4,
                               moe_ffn_hidden_size=32, moe_router_topk=2, gated_linear_unit=True,
                               activation_func=torch.nn.functional.silu, add_bias_linear=False,
                               use_cpu_initialization=True, bias_activation_fusion=False)
    with patches.replaced("megatron-lm.block-spec", state.block_spec_function):
        spec = builders.get_gpt_decoder_block_spec(config, use_transformer_engine=False,
                                                   normalization="RMSNorm", vp_stage=None)
    assert builders.get_gpt_decoder_block_spec is get_gpt_decoder_block_spec  # restored
    sub = compat.moe_submodules(spec.layer_specs[0].submodules.mlp)
    assert sub.router.router_cls is ROUTERS["ermoe"]
    experts = sub.experts.func if hasattr(sub.experts, "func") else sub.experts.module
    assert experts is GroupedGemmExperts


class RecordingRegularizers:
    """Stands in for ``install.Regularizers``: records the calls the wrapper makes; its plans come
    from the real step policy."""

    def __init__(self, policy: StepPolicy):
        self.policy = policy
        self.calls = []

    def begin_step(self, step, plan=None):
        plan = self.policy.plan(step)
        self.calls.append(("begin", plan.measure, plan.expensive))
        return plan

    def finish_step(self, step, writer=None):
        self.calls.append(("report", step, writer))
        return {"specialization_loss": 0.5, "specialization_loss_layer_1": 0.5} if writer else {}


def test_train_step_wrapper_measures_at_log_steps_and_reports():
    ns = megatron_lm_namespace(["--log-interval", "2"], ["--moe-metrics-interval", "4"])
    state = MegatronLMPlugin(lambda: ns)
    state.regularizers = regs = RecordingRegularizers(StepPolicy(log_interval=2, metrics_interval=4))
    lines, steps = [], []
    wrapped = state.train_step_function(lambda *a, **k: steps.append(k.get("iteration")) or "out",
                                        writer=lambda: "writer", log=lines.append)
    assert [wrapped(iteration=i) for i in range(4)] == ["out"] * 4
    assert steps == [0, 1, 2, 3]
    begins = [c for c in regs.calls if c[0] == "begin"]
    assert begins == [("begin", False, False), ("begin", True, False), ("begin", False, False), ("begin", True, True)]
    assert [c for c in regs.calls if c[0] == "report"] == [
        ("report", 1, None), ("report", 2, "writer"), ("report", 3, None), ("report", 4, "writer")]
    assert lines == [" moe-reg | iteration 2 | specialization_loss 0.5",
                     " moe-reg | iteration 4 | specialization_loss 0.5"]
    # versions whose train_step gets no iteration: counted from Megatron-LM's args.iteration
    ns.iteration = 10
    fresh = MegatronLMPlugin(lambda: ns)
    fresh.regularizers = RecordingRegularizers(StepPolicy(log_interval=2, metrics_interval=4))
    fresh.train_step_function(lambda *a, **k: None, writer=lambda: "w", log=lines.append)()
    assert fresh.regularizers.calls[0] == ("begin", False, False) and fresh.iteration == 11
