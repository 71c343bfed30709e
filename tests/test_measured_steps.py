"""What a measured (log) step records, and that its cheaper paths give the exact values: the router
geometry from the row Gram equals the SVD's, the weight MSO appears for both kinds only on
``--moe-metrics-interval`` steps (the trained kind on every measured step), and R_sp measured without
gradient equals the value of the loss with gradient."""

import math

import pytest
import torch

from megatron_moe_reg.integration.regularizers import StepPlan

from helpers import SMALL_MODEL_STYLE

LAYERS = 3


def _setup(layers: int, *flags: str):
    from megatron_moe_reg.training import trainer
    from megatron_moe_reg.training.arguments import parse_args

    cfg = parse_args([*SMALL_MODEL_STYLE, "--mock-data", "--vocab-size", "128", "--num-layers", str(layers),
                      "--hidden-size", "32", "--num-attention-heads", "4", "--num-experts", "4",
                      "--moe-ffn-hidden-size", "24", "--moe-router-topk", "2", "--seq-length", "16",
                      "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "10",
                      "--lr-warmup-iters", "0", "--moe-metrics-interval", "2", "--moe-metrics-sample-tokens", "8",
                      "--moe-weight-orthogonality-coeff", "0.1", "--moe-weight-orthogonality-weights", "fc2",
                      *flags], world_size=1)
    return trainer.setup(cfg)


@pytest.fixture(scope="module")
def ctx():
    yield _setup(LAYERS)
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


def _step(ctx, plan: StepPlan, coefficients: dict[str, float] | None = None) -> tuple[dict, list, list]:
    """One training step under ``plan``; (reported values, router weights and expert weights before it)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_moe_reg.integration.megatron.expert_weights import local_expert_weights
    from megatron_moe_reg.training.data import make_loader
    from megatron_moe_reg.training.step import train_step

    regs = ctx.regularizers
    regs.set_coefficients(coefficients or {"moe_specialization_loss_coeff": 0.0})
    layers = [m for m in ctx.gpt_model.modules() if isinstance(m, MoELayer)]
    routers = [layer.router.penalty_matrix().detach().double().clone() for layer in layers]
    experts = [[w.detach().clone() for w in local_expert_weights(layer.experts, "fc1")] for layer in layers]
    regs.begin_step(1, plan)
    train_step(ctx, iter(make_loader(ctx.datasets[0], ctx.cfg)))
    return regs.finish_step(1), routers, experts


def _layer_keys(values: dict, prefix: str) -> set[str]:
    return {k for k in values if k.startswith(prefix + "_layer_")}


def test_router_geometry_from_the_gram_equals_the_svd(ctx):
    values, routers, _ = _step(ctx, StepPlan(measure=True))
    for i, W in enumerate(routers):
        singular = torch.linalg.svdvals(W)
        unit = W / W.norm(dim=1, keepdim=True)
        row_error = torch.linalg.matrix_norm(unit @ unit.t() - torch.eye(W.shape[0], dtype=W.dtype))
        assert values[f"router_sigma_max_layer_{i}"] == pytest.approx(float(singular[0]), rel=1e-10)
        assert values[f"router_stable_rank_layer_{i}"] == pytest.approx(float((singular**2).sum() / singular[0] ** 2),
                                                                        rel=1e-10)
        assert values[f"router_row_orthogonality_error_layer_{i}"] == pytest.approx(float(row_error), rel=1e-9)
        assert values[f"router_condition_number_layer_{i}"] == pytest.approx(float(singular[0] / singular[-1]),
                                                                             rel=1e-8)
        share = singular**2 / (singular**2).sum()
        entropy = -(share * share.log()).sum() / math.log(len(singular))
        assert values[f"router_svd_entropy_layer_{i}"] == pytest.approx(float(entropy), rel=1e-9)
        cosine = unit @ unit.t()
        pairs = W.shape[0] * (W.shape[0] - 1)
        assert values[f"router_row_cosine_mean_layer_{i}"] == pytest.approx(
            float((cosine.sum() - cosine.trace()) / pairs), rel=1e-9, abs=1e-12)


def test_weight_mso_of_both_kinds_only_on_metrics_interval_steps(ctx):
    from megatron_moe_reg.metrics import weight_mso

    log_step, _, _ = _step(ctx, StepPlan(measure=True))
    assert _layer_keys(log_step, "weight_mso_fc2") == {f"weight_mso_fc2_layer_{i}" for i in range(LAYERS)}
    assert not _layer_keys(log_step, "weight_mso_fc1")  # not trained: measured at the metrics interval
    plain, _, _ = _step(ctx, StepPlan())
    assert not _layer_keys(plain, "weight_mso")
    metrics_step, _, experts = _step(ctx, StepPlan(measure=True, expensive=True))
    for i, weights in enumerate(experts):
        assert metrics_step[f"weight_mso_fc1_layer_{i}"] == pytest.approx(float(weight_mso(weights)), rel=1e-5)
    assert _layer_keys(metrics_step, "weight_mso_fc2")


def test_specialization_measured_without_gradient_equals_the_loss(ctx):
    """The same weights and batches: R_sp with λ_sp > 0 (autograd function) and λ_sp = 0 (value only)."""
    state = {k: v.clone() for k, v in ctx.gpt_model.state_dict().items() if isinstance(v, torch.Tensor)}
    optimizer_lr = [g["lr"] for g in ctx.optimizer.param_groups]
    for g in ctx.optimizer.param_groups:
        g["lr"] = 0.0  # the step leaves the weights as they are
    try:
        measured, _, _ = _step(ctx, StepPlan(measure=True))
        trained, _, _ = _step(ctx, StepPlan(measure=True), {"moe_specialization_loss_coeff": 1e-3})
    finally:
        for g, lr in zip(ctx.optimizer.param_groups, optimizer_lr, strict=True):
            g["lr"] = lr
        ctx.gpt_model.load_state_dict(state, strict=False)
    keys = _layer_keys(measured, "specialization_loss")
    assert keys and keys == _layer_keys(trained, "specialization_loss")
    for key in keys:
        assert measured[key] == pytest.approx(trained[key], rel=1e-6)


def test_a_second_model_in_the_same_process_reports_its_own_layers(ctx):
    """Each installed model keeps its own metrics, sized by its own layer count: a model built later
    in the process, with fewer layers and a metric the first does not record (an eigenbasis
    router's basis error), neither sees nor breaks the first one's."""
    _step(ctx, StepPlan(measure=True))
    other = _setup(LAYERS - 1, "--moe-router-type", "ermoe")
    values, _, _ = _step(other, StepPlan(measure=True))
    for name in ("router_sigma_max", "router_basis_orthonormality_error"):
        assert _layer_keys(values, name) == {f"{name}_layer_{i}" for i in range(LAYERS - 1)}
    values, _, _ = _step(ctx, StepPlan(measure=True))
    assert _layer_keys(values, "router_sigma_max") == {f"router_sigma_max_layer_{i}" for i in range(LAYERS)}
    assert not _layer_keys(values, "router_basis_orthonormality_error")
