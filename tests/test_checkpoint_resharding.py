"""Checkpoints move between parallel layouts: model and optimizer state reshard on load."""

import pytest

from helpers import pretrain

pytestmark = pytest.mark.multiprocess

STEPS = ["--train-iters", "4", "--lr-decay-iters", "4", "--micro-batch-size", "4", "--global-batch-size", "8",
         "--moe-aux-loss-coeff", "0"]
EP2 = ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("reshard")
    pretrain(out, "init", ["--train-iters", "0", "--lr-decay-iters", "4", "--save", str(out / "init")])
    rows = pretrain(out, "straight", STEPS + ["--load", str(out / "init"), "--finetune"])
    return out, rows


def _compare(expected, rows):
    assert [r["iteration"] for r in rows] == [3, 4]
    for a, b in zip(expected[2:], rows, strict=False):
        for key in ("lm loss", "grad norm", "lr"):
            assert b[key] == pytest.approx(a[key], rel=2e-5), (key, a, b)


@pytest.mark.parametrize("save_layout, load_layout", [
    pytest.param((1, []), (2, EP2), marks=pytest.mark.compat),  # an EP=1 checkpoint resumes at EP=2
    ((2, EP2), (1, [])),  # and back
    ((2, ["--use-distributed-optimizer"]), (2, ["--pipeline-model-parallel-size", "2"])),
], ids=["ep1-to-ep2", "ep2-to-ep1", "distopt-dp2-to-pp2"])
def test_resume_under_another_layout(straight, save_layout, load_layout, request):
    out, expected = straight
    name = request.node.callspec.id
    ck = out / f"ck-{name}"
    (n_save, save_flags), (n_load, load_flags) = save_layout, load_layout
    pretrain(out, f"{name}-first", STEPS + save_flags + ["--load", str(out / "init"), "--finetune",
                                                         "--exit-interval", "2", "--save", str(ck)], nproc=n_save)
    rows = pretrain(out, f"{name}-resumed", STEPS + load_flags + ["--load", str(ck)], nproc=n_load)
    _compare(expected, rows)
