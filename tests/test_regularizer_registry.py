"""Adding a regularizer takes one function, one class, one registry line and one config field: a toy
one, defined here and nowhere in the package, trains one step of the real GPT-MoE and its metric
reaches the run's report (the JSON-lines log)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_moe_reg.config import PluginConfig, coefficient
from megatron_moe_reg.integration.megatron.aux_loss import attach_local_mean_loss
from megatron_moe_reg.integration.regularizers import REGULARIZERS, InstallContext, RegularizerBase, StepPlan

from helpers import SMALL_MODEL_STYLE, read_metrics

pytestmark = pytest.mark.compat


def toy_loss(out_NH: torch.Tensor) -> torch.Tensor:  # 1. the pure function
    """mean_n ‖y_n‖² of the experts' output rows."""
    return out_NH.float().pow(2).sum(-1).mean()


class ToyLoss(RegularizerBase):  # 2. the component
    coefficient_field = "moe_toy_loss_coeff"

    def __init__(self, ctx: InstallContext):
        self.ctx, self.coeff = ctx, ctx.plugin.moe_toy_loss_coeff
        for layer in ctx.layers:
            layer.experts.register_forward_hook(self._after_experts(layer))

    @classmethod
    def build(cls, ctx: InstallContext) -> ToyLoss | None:
        return cls(ctx) if ctx.plugin.moe_toy_loss_coeff > 0 else None

    def metric_names(self, plan: StepPlan) -> list[str]:
        return ["toy_loss"]

    def set_coefficient(self, value: float) -> None:
        self.coeff = value

    def _after_experts(self, layer):
        def hook(module, inputs, output):
            if not (module.training and torch.is_grad_enabled()):
                return None
            out, bias = output
            loss = toy_loss(out)
            self.ctx.tracker.record(
                "toy_loss", loss, layer.layer_number, self.ctx.num_layers, avg_group=layer.router.tp_cp_group
            )
            out = attach_local_mean_loss(
                out,
                loss,
                self.coeff,
                tp_cp_size=layer.router.tp_cp_group.size(),
                calculate_per_token_loss=False,
                num_local_tokens=out.shape[0],
            )
            return out, bias

        return hook


@dataclasses.dataclass
class ToyPluginConfig(PluginConfig):  # 4. the config field (in the package: a field of PluginConfig)
    moe_toy_loss_coeff: float = coefficient(0.0, "lambda of the toy loss")


def test_a_registered_toy_regularizer_trains_and_is_reported(tmp_path, monkeypatch):
    from megatron.core import parallel_state

    from megatron_moe_reg.training import trainer
    from megatron_moe_reg.training.arguments import parse_args

    monkeypatch.setitem(REGULARIZERS, "toy", ToyLoss.build)  # 3. the registry line
    cfg = parse_args(
        [
            *SMALL_MODEL_STYLE,
            "--mock-data",
            "--vocab-size",
            "128",
            "--num-layers",
            "2",
            "--hidden-size",
            "32",
            "--num-attention-heads",
            "4",
            "--num-experts",
            "4",
            "--moe-ffn-hidden-size",
            "24",
            "--seq-length",
            "16",
            "--micro-batch-size",
            "2",
            "--train-iters",
            "2",
            "--lr-warmup-iters",
            "0",
            "--log-interval",
            "1",
            "--eval-iters",
            "0",
            "--no-progress-bar",
            "--no-moe-reg-measure",
            "--log-file",
            str(tmp_path / "log.jsonl"),
        ],
        world_size=1,
    )
    cfg.plugin = ToyPluginConfig(**dataclasses.asdict(cfg.plugin), moe_toy_loss_coeff=0.5)
    assert cfg.plugin.any_loss  # the new coefficient field turns the plugin on
    try:
        ctx = trainer.setup(cfg)
        assert ctx.regularizers is not None and "toy" in ctx.regularizers.components
        trainer.train(ctx)
    finally:
        parallel_state.destroy_model_parallel()
    rows = read_metrics(tmp_path / "log.jsonl")
    assert len(rows) == 2 and all(row["toy_loss"] > 0 for row in rows)
    assert "toy_loss_layer_0" in rows[0] and "toy_loss_layer_1" in rows[0]
