"""R_sp and R_cp: values and gradients are invariant to DP, EP (both dispatchers), TP+SP (expert
tensor parallel), PP (a coupling pair across the stage boundary), TP x EP, micro-batching,
activation recompute and ``--calculate-per-token-loss``; so are the routing metrics reported
with them (entropy, load, weight MSO, router geometry, PES and activation MSO).

Every run loads the same initial checkpoint and takes one global batch with the LM loss
multiplied by 0 (tests/grad_probe.py), so the gradients are those of the plugin losses alone.
"""

import pytest
import torch

from helpers import LOSS_LAYOUTS as LAYOUTS
from helpers import LOSS_MODEL as MODEL
from helpers import assert_same, pretrain, probe

pytestmark = pytest.mark.multiprocess



SHARED = ["--moe-shared-expert-intermediate-size", "64", "--moe-specialization-include-shared-experts"]
SHARED_LAYOUTS = {
    "dp2": (2, []),
    "ep2-alltoall": (2, ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall"]),
    "tp2-sp": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    out = tmp_path_factory.mktemp("losses")
    pretrain(out, "init", ["--train-iters", "0", "--lr-decay-iters", "4", "--save", str(out / "init")], model=MODEL)
    return out


@pytest.fixture(scope="module")
def shared_workdir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shared")
    pretrain(out, "init", ["--train-iters", "0", "--lr-decay-iters", "4", "--save", str(out / "init")],
             model=MODEL + SHARED)
    values, grads = probe(out / "reference", ["--load", str(out / "init"), "--finetune"], 1, MODEL + SHARED)
    return out, values, grads


@pytest.fixture(scope="module")
def reference(workdir):
    values, grads = probe(workdir / "reference", ["--load", str(workdir / "init"), "--finetune"], 1)
    assert {"specialization_loss", "coupling_loss", "pes", "activation_mso", "load_cv"} <= values.keys()
    assert len([k for k in values if k.startswith("coupling_loss_layer_")]) == 3  # 4 MoE layers, 3 pairs
    assert len([k for k in values if k.startswith("specialization_loss_layer_")]) == 4
    return values, grads


def _router_and_fc1(grads: dict) -> dict:
    return {k: v for k, v in grads.items() if "router" in k or "linear_fc1" in k}


@pytest.mark.compat
def test_plugin_losses_alone_produce_router_and_expert_gradients(reference):
    _, grads = reference
    moving = _router_and_fc1(grads)
    assert moving and all(v.abs().sum() > 0 for v in moving.values())
    assert grads["embedding.word_embeddings.weight"].abs().sum() > 0  # R_sp reaches the inputs too


COMPAT = {"ep2-alltoall", "tp2-sp-etp2", "pp2", "recompute-full"}


@pytest.mark.parametrize("layout", [pytest.param(name, marks=pytest.mark.compat) if name in COMPAT else name
                                    for name in LAYOUTS])
def test_layout_reproduces_values_and_gradients(layout, workdir, reference):
    nproc, flags = LAYOUTS[layout]
    values, grads = probe(workdir / layout, flags + ["--load", str(workdir / "init"), "--finetune"], nproc)
    assert_same(values, grads, *reference, layout)


@pytest.mark.parametrize("layout", list(SHARED_LAYOUTS))
def test_shared_expert_slot_is_layout_invariant(layout, shared_workdir):
    out, ref_values, ref_grads = shared_workdir
    nproc, flags = SHARED_LAYOUTS[layout]
    values, grads = probe(out / layout, flags + ["--load", str(out / "init"), "--finetune"], nproc,
                          MODEL + SHARED)
    assert_same(values, grads, ref_values, ref_grads, layout)
    shared_fc1 = [k for k in grads if "shared_experts.linear_fc1" in k]
    assert shared_fc1 and all(grads[k].abs().sum() > 0 for k in shared_fc1)  # R_sp reaches the shared expert


SAMPLED = ["--moe-specialization-max-tokens", "37"]  # of 4 x 32 tokens per micro-batch: uneven per TP rank
SAMPLED_LAYOUTS = {
    "ep2-allgather": (2, ["--expert-model-parallel-size", "2"]),
    "ep2-alltoall": (2, ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall"]),
    "tp2-sp-etp2-alltoall": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                 "--moe-token-dispatcher-type", "alltoall"]),
}


@pytest.fixture(scope="module")
def sampled_reference(shared_workdir):
    out = shared_workdir[0]
    values, grads = probe(out / "sampled", ["--load", str(out / "init"), "--finetune", *SAMPLED], 1, MODEL + SHARED)
    return out, values, grads


def test_token_subsample_changes_the_loss(sampled_reference, shared_workdir):
    _, values, _ = sampled_reference
    _, exact, _ = shared_workdir
    assert values["specialization_loss"] != pytest.approx(exact["specialization_loss"], rel=1e-4)
    assert values["specialization_loss"] == pytest.approx(exact["specialization_loss"], rel=0.5)


@pytest.mark.parametrize("layout", list(SAMPLED_LAYOUTS))
def test_token_subsample_is_layout_invariant(layout, sampled_reference):
    out, ref_values, ref_grads = sampled_reference
    nproc, flags = SAMPLED_LAYOUTS[layout]
    values, grads = probe(out / f"sampled-{layout}", flags + ["--load", str(out / "init"), "--finetune", *SAMPLED],
                          nproc, MODEL + SHARED)
    assert_same(values, grads, ref_values, ref_grads, layout)


def test_bf16_matches_fp32_within_bf16_precision(workdir, reference):
    values, grads = probe(workdir / "bf16", ["--bf16", "--load", str(workdir / "init"), "--finetune"], 1)
    ref_values, ref_grads = reference
    losses = [k for k in ref_values if k.startswith(("specialization_loss", "coupling_loss"))]
    assert losses
    for key in losses:  # (routing counts are discrete: bf16 may move a token to another expert)
        assert values[key] == pytest.approx(ref_values[key], rel=3e-2, abs=2e-3), key
    for key in _router_and_fc1(ref_grads):
        a, b = grads[key].float().flatten(), ref_grads[key].flatten()
        assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.98, key
