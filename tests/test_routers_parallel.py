"""Every router (with the SR-MoE penalties and the coupling loss on) gives the same values and
gradients under EP (alltoall), TP+SP and PP as in one process, LM loss included; its state goes
through checkpoints and reshards across EP sizes."""

import pytest

from helpers import PENALTIES, ROUTER_FLAGS, TINY_MODEL, assert_same, pretrain, probe, without

pytestmark = pytest.mark.multiprocess

MODEL = without(TINY_MODEL, "--num-layers") + ["--num-layers", "4", "--moe-aux-loss-coeff", "1e-2"]
LAYOUTS = {
    "ep2-alltoall": (2, ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall"]),
    "tp2-sp": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
}
COMPAT = {("ermoe", "ep2-alltoall"), ("spectral", "tp2-sp")}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    out = tmp_path_factory.mktemp("routers")
    refs = {}
    for name, flags in ROUTER_FLAGS.items():
        model = MODEL + flags + PENALTIES
        pretrain(out, f"{name}-init", ["--train-iters", "0", "--lr-decay-iters", "4",
                                       "--save", str(out / f"{name}-init")], model=model)
        refs[name] = probe(out / f"{name}-reference", ["--load", str(out / f"{name}-init"), "--finetune"], 1,
                           ["--lm-loss-scale", "1.0"] + model)
    return out, refs


def _cases():
    for name in ROUTER_FLAGS:
        for layout in LAYOUTS:
            marks = [pytest.mark.compat] if (name, layout) in COMPAT else []
            yield pytest.param(name, layout, marks=marks, id=f"{name}-{layout}")


@pytest.mark.parametrize("name, layout", list(_cases()))
def test_router_is_layout_invariant(name, layout, references):
    out, refs = references
    nproc, flags = LAYOUTS[layout]
    model = MODEL + ROUTER_FLAGS[name] + PENALTIES
    values, grads = probe(out / f"{name}-{layout}", flags + ["--load", str(out / f"{name}-init"), "--finetune"],
                          nproc, ["--lm-loss-scale", "1.0"] + model)
    ref_values, ref_grads = refs[name]
    assert {"router_sigma_max", "router_stable_rank"} <= values.keys()
    assert_same(values, grads, ref_values, ref_grads, f"{name}-{layout}")
    router = [k for k in ref_grads if ".router." in k]
    assert router and all(ref_grads[k].abs().sum() > 0 for k in router)  # every router tensor learns
