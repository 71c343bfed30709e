"""Each router trains a tiny GPT-MoE on the embedded corpus; router state survives checkpoints
and EP resharding (resumed runs continue with the same losses)."""

import pytest

from helpers import PENALTIES, ROUTER_FLAGS, TINY_MODEL, data_flags, pretrain, without

pytestmark = pytest.mark.multiprocess


@pytest.mark.parametrize("name", list(ROUTER_FLAGS))
def test_router_trains_with_falling_loss(name, embedded_dataset, tmp_path):
    rows = pretrain(tmp_path, name, ROUTER_FLAGS[name] + PENALTIES +
                    ["--train-iters", "30", "--lr", "3e-3", "--lr-warmup-iters", "3", "--micro-batch-size", "8",
                     "--seq-length", "64", "--log-interval", "10"],
                    data=data_flags(embedded_dataset), model=without(TINY_MODEL, "--vocab-size", "--log-interval"))
    assert len(rows) == 3
    assert rows[-1]["lm loss"] < rows[0]["lm loss"] - 0.5, [r["lm loss"] for r in rows]
    if name in ("ermoe", "emoe"):  # exactly orthonormal after 30 optimizer steps
        assert all(r["router_basis_orthonormality_error"] < 1e-5 for r in rows)
    if name == "ermoe":
        assert all(0.0 <= r["eigen_qualified_fraction"] <= 1.0 for r in rows)


@pytest.mark.parametrize("name", ["spectral", "ermoe"])
def test_router_state_resumes_across_ep_sizes(name, tmp_path):
    model = TINY_MODEL + ROUTER_FLAGS[name] + PENALTIES
    steps = ["--train-iters", "4", "--lr-decay-iters", "4", "--micro-batch-size", "4", "--global-batch-size", "8"]
    straight = pretrain(tmp_path, "straight", steps, model=model)
    pretrain(tmp_path, "first", steps + ["--exit-interval", "2", "--save", str(tmp_path / "ck")], model=model)
    resumed = pretrain(tmp_path, "resumed", steps + ["--load", str(tmp_path / "ck"), "--expert-model-parallel-size",
                                                     "2", "--moe-token-dispatcher-type", "alltoall"],
                       nproc=2, model=model)
    assert [r["iteration"] for r in resumed] == [3, 4]
    for a, b in zip(straight[2:], resumed, strict=False):
        for key in ("lm loss", "grad norm", "router_sigma_max", "router_stable_rank"):
            assert b[key] == pytest.approx(a[key], rel=2e-5), (key, a, b)
