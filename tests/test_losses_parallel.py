"""R_sp and R_cp: values and gradients are invariant to DP, EP (both dispatchers), TP+SP (expert
tensor parallel), PP (a coupling pair across the stage boundary), TP x EP, micro-batching,
activation recompute and ``--calculate-per-token-loss``; so are the routing metrics reported
with them (entropy, load, weight MSO, router geometry, PES and activation MSO).

Every run loads the same initial checkpoint and takes one global batch with the LM loss
multiplied by 0 (tests/grad_probe.py), so the gradients are those of the plugin losses alone.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY_MODEL, _env, pretrain, without

from megatron_moe_reg.training.checkpointing import read_model_tensors

pytestmark = pytest.mark.multiprocess

PROBE = str(Path(__file__).parent / "grad_probe.py")
MODEL = without(TINY_MODEL, "--num-layers") + ["--num-layers", "4", "--moe-aux-loss-coeff", "0"]
LOSSES = ["--moe-specialization-loss-coeff", "1.0", "--moe-coupling-loss-coeff", "1.0",
          "--moe-metrics-interval", "1", "--moe-metrics-sample-tokens", "16"]  # PES / MSO: 16 = seq / TP
BATCH = ["--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", "1", "--lr-warmup-iters", "0"]
LAYOUTS = {
    "dp2": (2, []),
    "ep2-allgather": (2, ["--expert-model-parallel-size", "2"]),
    "ep2-alltoall": (2, ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall"]),
    "tp2-sp-etp2": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "tp2-sp-etp2-alltoall": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                 "--moe-token-dispatcher-type", "alltoall"]),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
    "one-micro-batch": (1, ["--micro-batch-size", "8"]),
    "recompute-full": (1, ["--recompute-granularity", "full", "--recompute-method", "uniform",
                           "--recompute-num-layers", "1"]),
    "recompute-selective-moe": (1, ["--recompute-granularity", "selective", "--recompute-modules", "moe"]),
    "per-token-loss": (1, ["--calculate-per-token-loss"]),
    "pp2-recompute-full": (2, ["--pipeline-model-parallel-size", "2", "--recompute-granularity", "full",
                               "--recompute-method", "uniform", "--recompute-num-layers", "1"]),
    "tp2-sp-per-token-loss": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                  "--calculate-per-token-loss"]),
    "tp2-sp-ep2-etp1": (4, ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                            "--expert-model-parallel-size", "2", "--expert-tensor-parallel-size", "1",
                            "--moe-token-dispatcher-type", "alltoall"]),
}


SHARED = ["--moe-shared-expert-intermediate-size", "64", "--moe-specialization-include-shared-experts"]
SHARED_LAYOUTS = {
    "dp2": (2, []),
    "ep2-alltoall": (2, ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall"]),
    "tp2-sp": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
}


def probe(out: Path, flags: list[str], nproc: int, model: list[str] = MODEL) -> tuple[dict, dict]:
    """Run tests/grad_probe.py; ``model`` may start with ``--lm-loss-scale S``."""
    head = model[:2] if model[:1] == ["--lm-loss-scale"] else []
    cmd = [sys.executable, PROBE, str(out), *head, *model[len(head):], "--mock-data", *BATCH, *LOSSES, *flags]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *cmd[1:]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env())
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads((out / "values.json").read_text()), read_model_tensors(str(out / "grads"))


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


def _assert_same(values, grads, ref_values, ref_grads, layout):
    assert values.keys() == ref_values.keys()
    for key, expected in ref_values.items():
        assert values[key] == pytest.approx(expected, rel=1e-5, abs=1e-7), (layout, key)
    assert grads.keys() == ref_grads.keys()
    for key, expected in ref_grads.items():
        scale = expected.abs().max().item()
        diff = (grads[key] - expected).abs().max().item()
        assert diff <= 1e-5 * max(scale, 1e-3), (layout, key, diff, scale)


COMPAT = {"ep2-alltoall", "tp2-sp-etp2", "pp2", "recompute-full"}


@pytest.mark.parametrize("layout", [pytest.param(name, marks=pytest.mark.compat) if name in COMPAT else name
                                    for name in LAYOUTS])
def test_layout_reproduces_values_and_gradients(layout, workdir, reference):
    nproc, flags = LAYOUTS[layout]
    values, grads = probe(workdir / layout, flags + ["--load", str(workdir / "init"), "--finetune"], nproc)
    _assert_same(values, grads, *reference, layout)


@pytest.mark.parametrize("layout", list(SHARED_LAYOUTS))
def test_shared_expert_slot_is_layout_invariant(layout, shared_workdir):
    out, ref_values, ref_grads = shared_workdir
    nproc, flags = SHARED_LAYOUTS[layout]
    values, grads = probe(out / layout, flags + ["--load", str(out / "init"), "--finetune"], nproc,
                          MODEL + SHARED)
    _assert_same(values, grads, ref_values, ref_grads, layout)
    shared_fc1 = [k for k in grads if "shared_experts.linear_fc1" in k]
    assert shared_fc1 and all(grads[k].abs().sum() > 0 for k in shared_fc1)  # R_sp reaches the shared expert


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
