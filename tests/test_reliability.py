"""Non-finite values never reach the weights or a checkpoint, and the metrics survive them."""

import math

import pytest
import torch

from helpers import MOCK, TINY_MODEL, run_cli

DIVERGING = [*TINY_MODEL, *MOCK, "--lr", "1e30", "--min-lr", "1e30", "--lr-warmup-iters", "0", "--train-iters", "4",
             "--save-interval", "1"]  # step 1's update makes step 2's gradient norm nan


def _one_line(proc, starts: str) -> str:
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("moe-reg: ")]
    assert line.startswith(starts), line
    return line


def test_a_non_finite_gradient_norm_stops_before_the_update(tmp_path):
    from megatron_moe_reg.training.checkpointing import read_model_tensors

    ck = tmp_path / "ck"
    proc = run_cli(["pretrain", *DIVERGING, "--save", str(ck)], check=False)
    assert proc.returncode == 1
    line = _one_line(proc, "moe-reg: stopped: iteration 2: the gradient norm is nan (LM loss ")
    assert f"the update was not applied. Last good checkpoint: {ck / 'iter_0000001'}" in line
    assert "--no-check-for-nan-in-loss-and-grad" in line
    assert (ck / "latest_checkpointed_iteration.txt").read_text() == "1" and not (ck / "iter_0000002").exists()
    weights = read_model_tensors(str(ck))
    assert weights and all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())


def test_without_the_check_no_checkpoint_with_non_finite_weights_is_written(tmp_path):
    """--no-check-for-nan-in-loss-and-grad applies the step; the metrics report nan (no crash in the
    router geometry's SVD) and the save refuses."""
    ck = tmp_path / "ck"
    proc = run_cli(["pretrain", *DIVERGING, "--save", str(ck), "--no-check-for-nan-in-loss-and-grad"], check=False)
    assert proc.returncode == 1
    assert "iteration      2/4" in proc.stdout and "grad norm nan" in proc.stdout
    _one_line(proc, "moe-reg: stopped: iteration 2: the model's weights are not finite; no checkpoint written "
                    f"(last good: {ck / 'iter_0000001'})")
    assert (ck / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert sorted(p.name for p in ck.iterdir()) == ["iter_0000001", "latest_checkpointed_iteration.txt"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_router_geometry_of_non_finite_weights_is_nan(bad):
    from megatron_moe_reg.metrics.geometry import router_geometry

    W = torch.randn(4, 8)
    W[1, 2] = bad
    assert all(math.isnan(v) for v in router_geometry(W).values())
    assert router_geometry(torch.eye(3)) == pytest.approx({
        "router_sigma_max": 1.0, "router_stable_rank": 3.0, "router_row_orthogonality_error": 0.0,
        "router_condition_number": 1.0, "router_svd_entropy": 1.0, "router_row_cosine_mean": 0.0})
