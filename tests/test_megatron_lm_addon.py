"""The Megatron-LM add-on's pieces in one process: the plugin's flags taken off a Megatron-LM
command line and checked against Megatron-LM-named options, the block-spec replacement, the
train-step wrapper's schedule and writers, and the flags a machine without TE / Apex gets.
(Megatron-LM's whole loop: tests/test_megatron_lm_loop.py.)"""

import argparse
import dataclasses
import importlib.util
import sys
import types
from pathlib import Path

import pytest

from megatron_moe_reg.errors import ConfigError
from megatron_moe_reg.integration.install import StepPolicy
from megatron_moe_reg.integration.megatron import compat, patches
from megatron_moe_reg.integration.megatron_lm.entry import machine_flags
from megatron_moe_reg.integration.megatron_lm.plugin import MegatronLMPlugin, plugin_options, split_plugin_flags
from megatron_moe_reg.training.arguments import parse_args

from helpers import PARSE_BASE, run_cli

MOCK = PARSE_BASE  # mock data, 8 experts, the small-model style


def megatron_lm_namespace(model_flags: list[str]) -> argparse.Namespace:
    """A namespace as Megatron-LM's parser leaves it: its options under their Megatron-LM names
    (ours are the same names)."""
    run = parse_args(MOCK + model_flags)
    values = {}
    for group in (run.model, run.moe, run.parallel, run.train, run.data, run.log):
        values.update(dataclasses.asdict(group))
    values["world_size"] = run.world_size
    return argparse.Namespace(**values, iteration=0)


def test_plugin_flags_are_taken_off_the_command_line_and_validated_against_megatron_lm_options():
    argv = ["--num-layers", "4", "--moe-specialization-loss-coeff", "2e-3", "--lr", "1e-3",
            "--moe-router-type=spectral", "--no-moe-reg-measure", "--moe-router-topk", "2"]
    plugin, rest = split_plugin_flags(argv)
    assert rest == ["--num-layers", "4", "--lr", "1e-3", "--moe-router-topk", "2"]  # Megatron-LM's, in order
    assert plugin.moe_specialization_loss_coeff == 2e-3 and plugin.moe_router_type == "spectral"
    assert plugin.moe_coupling_loss_coeff == 0.0 and not plugin.moe_reg_measure  # unset flags keep defaults
    plugin_options(megatron_lm_namespace([]), plugin)
    triton, _ = split_plugin_flags(["--moe-grouped-gemm-backend", "triton"])
    with pytest.raises(ConfigError, match="computes bias-free SwiGLU experts"):
        plugin_options(megatron_lm_namespace(["--no-swiglu"]), triton)
    with pytest.raises(ConfigError, match="--moe-coupling-loss-coeff must be >= 0"):
        split_plugin_flags(["--moe-coupling-loss-coeff", "-1"])
    with pytest.raises(SystemExit):  # argparse refuses an unknown choice (one line, exit 2)
        split_plugin_flags(["--moe-router-type", "nope"])


@pytest.mark.compat
def test_block_spec_function_swaps_router_and_experts(groups, monkeypatch):
    import torch
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_moe_reg.experts.grouped_experts import GroupedGemmExperts
    from megatron_moe_reg.routers import ROUTERS

    plugin, _ = split_plugin_flags(["--moe-router-type", "ermoe", "--moe-grouped-gemm-backend", "triton"])
    ns = megatron_lm_namespace([])
    state = MegatronLMPlugin(plugin, lambda: ns)
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


class RecordingWandb:
    def __init__(self):
        self.logged = []

    def log(self, values, step):
        self.logged.append((step, values))


def test_train_step_wrapper_measures_at_log_steps_and_reports():
    plugin, _ = split_plugin_flags(["--moe-metrics-interval", "4"])
    ns = megatron_lm_namespace(["--log-interval", "2"])
    state = MegatronLMPlugin(plugin, lambda: ns)
    state.regularizers = regs = RecordingRegularizers(StepPolicy(log_interval=2, metrics_interval=4))
    lines, steps, wandb = [], [], RecordingWandb()
    wrapped = state.train_step_function(lambda *a, **k: steps.append(k.get("iteration")) or "out",
                                        writers=lambda: ("writer", wandb), log=lines.append)
    assert [wrapped(iteration=i) for i in range(4)] == ["out"] * 4
    assert steps == [0, 1, 2, 3]
    begins = [c for c in regs.calls if c[0] == "begin"]
    assert begins == [("begin", False, False), ("begin", True, False), ("begin", False, False), ("begin", True, True)]
    assert [c for c in regs.calls if c[0] == "report"] == [
        ("report", 1, None), ("report", 2, "writer"), ("report", 3, None), ("report", 4, "writer")]
    assert lines == [" moe-reg | iteration 2 | specialization_loss 0.5 | specialization_loss_layer_1 0.5",
                     " moe-reg | iteration 4 | specialization_loss 0.5 | specialization_loss_layer_1 0.5"]
    assert [step for step, _ in wandb.logged] == [2, 4]
    assert wandb.logged[0][1] == {"moe_reg/specialization_loss": 0.5, "moe_reg/specialization_loss_layer_1": 0.5}
    # a train_step not told the iteration: counted from Megatron-LM's args.iteration
    ns.iteration = 10
    fresh = MegatronLMPlugin(plugin, lambda: ns)
    fresh.regularizers = RecordingRegularizers(StepPolicy(log_interval=2, metrics_interval=4))
    fresh.train_step_function(lambda *a, **k: None, writers=lambda: ("w", None), log=lines.append)()
    assert fresh.regularizers.calls[0] == ("begin", False, False) and fresh.iteration == 11


def nothing(name: str) -> bool:
    """A machine where no kernel module imports."""
    return False


def test_a_machine_without_te_or_apex_turns_their_fusions_off_and_says_so():
    argv, note = machine_flags(["--lr", "1e-3", "--no-rope-fusion"], cuda=False, importable=nothing)
    assert argv == ["--lr", "1e-3", "--no-rope-fusion", "--distributed-backend", "gloo", "--transformer-impl",
                    "local", "--no-persist-layer-norm", "--no-gradient-accumulation-fusion",
                    "--no-masked-softmax-fusion"]
    assert note.startswith("moe-reg: no GPU, TransformerEngine / Apex kernels missing") and "gloo" in note
    kept, _ = machine_flags(["--transformer-impl", "local", "--distributed-backend=nccl"], cuda=False,
                            importable=nothing)
    assert kept.count("--transformer-impl") == 1 and "gloo" not in kept  # what the user gave stays
    full, note = machine_flags(["--lr", "1e-3"], cuda=True, importable=lambda name: True)
    assert full == ["--lr", "1e-3"] and note == ""
    te_only, _ = machine_flags([], cuda=True, importable=lambda name: name == "transformer_engine")
    assert te_only == ["--no-persist-layer-norm", "--no-gradient-accumulation-fusion"]
    te_unused, _ = machine_flags(["--transformer-impl=local"], cuda=True,
                                 importable=lambda name: name == "transformer_engine")
    assert te_unused[-1] == "--no-masked-softmax-fusion"  # local attention: Apex's softmax kernels


@pytest.mark.skipif(importlib.util.find_spec("megatron.training") is not None,
                    reason="this megatron-core ships megatron.training")
def test_moe_reg_megatron_lm_needs_a_megatron_core_that_ships_megatron_training():
    proc = run_cli(["megatron-lm", "--num-layers", "2"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line
    assert "does not ship megatron.training" in proc.stderr and "pretrain_gpt_moe_reg.py" in proc.stderr


def test_megatron_lms_initialize_does_not_rebuild_a_wheels_dataset_helper_on_any_machine():
    """pip wheels of megatron-core ship the compiled dataset helper without its Makefile, so the make that
    Megatron-LM's initialize runs fails and Megatron-LM exits, on a GPU as on a CPU: the row that skips it
    is applied whatever the machine (scope megatron-lm, not megatron-lm-cpu)."""
    from megatron.core.datasets import utils

    row = patches.BY_KEY["megatron-lm.compile-helpers"]
    assert row.scope == "megatron-lm"
    if (Path(utils.__file__).parent / "Makefile").exists():
        pytest.skip("megatron-core from a checkout: its make builds the helper")
    with pytest.raises((SystemExit, FileNotFoundError)):  # make finds no Makefile (or no make)
        utils.compile_helpers()
    with patches.replaced(row.key, row.make):
        assert utils.compile_helpers() is None
