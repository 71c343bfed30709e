"""The weight-orthogonality loss counts every expert pair whatever the layout: values and gradients
under EP (both dispatchers), TP+SP with expert-tensor parallelism and per-token loss, and TP x EP
equal the single process. With fc2 chosen, the fc2 gradients come from this loss alone."""

import pytest

from helpers import LOSS_LAYOUTS as LAYOUTS
from helpers import LOSS_MODEL as MODEL
from helpers import assert_same, pretrain, probe

pytestmark = pytest.mark.multiprocess

ORTH = {"fc2": ["--moe-weight-orthogonality-coeff", "10.0", "--moe-weight-orthogonality-weights", "fc2"],
        "fc1": ["--moe-weight-orthogonality-coeff", "10.0"]}
CASES = [("fc2", "ep2-alltoall"), ("fc2", "tp2-sp-ep2-etp1"), ("fc2", "tp2-sp-per-token-loss"),  # ETP 2 there
         ("fc1", "ep2-allgather")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    out = tmp_path_factory.mktemp("orthogonality")
    pretrain(out, "init", ["--train-iters", "0", "--lr-decay-iters", "4", "--save", str(out / "init")], model=MODEL)
    refs = {kind: probe(out / f"reference-{kind}", flags + ["--load", str(out / "init"), "--finetune"], 1)
            for kind, flags in ORTH.items()}
    return out, refs


def test_fc2_gradients_come_from_the_orthogonality_loss(setup):
    _, refs = setup
    values, grads = refs["fc2"]
    _, fc1_grads = refs["fc1"]
    key = "decoder.layers.mlp.experts.experts.linear_fc2.weight"  # [layer, expert, H, F]
    assert 0 < values["weight_mso_fc2"] < 1
    # the last layer's fc2 feeds only the LM loss (scaled by 0): its gradient is the loss's alone
    assert fc1_grads[key][-1].abs().sum() == 0
    assert all(grads[key][-1, e].abs().sum() > 0 for e in range(grads[key].shape[1]))


COMPAT = {("fc2", "tp2-sp-ep2-etp1")}


@pytest.mark.parametrize("kind, layout", [pytest.param(k, layout, marks=[pytest.mark.compat] if (k, layout) in COMPAT
                                                       else [], id=f"{k}-{layout}") for k, layout in CASES])
def test_orthogonality_is_layout_invariant(kind, layout, setup):
    out, refs = setup
    nproc, flags = LAYOUTS[layout]
    values, grads = probe(out / f"{kind}-{layout}", flags + ORTH[kind] + ["--load", str(out / "init"), "--finetune"],
                          nproc)
    assert_same(values, grads, *refs[kind], f"{kind}-{layout}")
