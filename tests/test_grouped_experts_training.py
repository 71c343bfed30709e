"""Grouped-GEMM experts inside the GPT-MoE: the triton and torch backends reproduce Megatron's
SequentialMLP (values and gradients of the LM loss plus R_sp, R_cp and the routing metrics) in one
process, under EP2 (alltoall), TP2+SP with expert-tensor parallelism and MoE recompute; training
gives the same losses, and checkpoints move between backends in both directions (optimizer state
included).

Without CUDA the triton kernels run in Triton's interpreter (tests/conftest.py)."""

from pathlib import Path

import pytest
import torch

from megatron_moe_reg.experts import backend_unavailable_reason
from megatron_moe_reg.training.checkpointing import read_model_tensors

from helpers import LOSS_MODEL as MODEL
from helpers import MOCK, TINY_MODEL, assert_same, pretrain, probe, read_metrics, run_cli

pytestmark = [pytest.mark.multiprocess,
              pytest.mark.skipif(backend_unavailable_reason("triton", torch.device("cpu")) is not None,
                                 reason="triton is not installed")]

WITH_LM = ["--lm-loss-scale", "1", *MODEL]
CASES = {  # name: (processes, flags)
    "triton": (1, ["--moe-grouped-gemm-backend", "triton"]),
    "torch": (1, ["--moe-grouped-gemm-backend", "torch"]),
    "triton-ep2-alltoall": (2, ["--moe-grouped-gemm-backend", "triton", "--expert-model-parallel-size", "2",
                                "--moe-token-dispatcher-type", "alltoall"]),
    "triton-tp2-sp-etp2": (2, ["--moe-grouped-gemm-backend", "triton", "--tensor-model-parallel-size", "2",
                               "--sequence-parallel"]),
    "triton-recompute-moe": (1, ["--moe-grouped-gemm-backend", "triton", "--recompute-granularity", "selective",
                                 "--recompute-modules", "moe"]),
}


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    """A SequentialMLP checkpoint and the values and gradients of one step from it."""
    out = tmp_path_factory.mktemp("grouped")
    pretrain(out, "init", ["--train-iters", "0", "--lr-decay-iters", "4", "--save", str(out / "init")], model=MODEL)
    values, grads = probe(out / "sequential", ["--load", str(out / "init"), "--finetune"], 1, WITH_LM)
    assert {"specialization_loss", "coupling_loss", "pes"} <= values.keys()
    return out, values, grads


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.compat) if c in ("triton", "triton-ep2-alltoall")
                                  else c for c in CASES])
def test_backend_reproduces_sequential_mlp(case, sequential):
    out, ref_values, ref_grads = sequential
    nproc, flags = CASES[case]
    values, grads = probe(out / case, flags + ["--load", str(out / "init"), "--finetune"], nproc, WITH_LM)
    assert_same(values, grads, ref_values, ref_grads, case)
    expert_fc1 = [k for k in grads if ".experts.experts.linear_fc1" in k]
    assert expert_fc1 and all(grads[k].abs().sum() > 0 for k in expert_fc1)


def test_training_and_checkpoints_move_between_backends(tmp_path: Path):
    steps = ["--micro-batch-size", "4", "--global-batch-size", "8", "--lr-decay-iters", "4"]
    runs = {}
    for backend in ("sequential", "triton"):
        log = tmp_path / f"{backend}.jsonl"
        proc = run_cli(["pretrain", *TINY_MODEL, *MOCK, *steps, "--train-iters", "3", "--log-file", str(log),
                        "--moe-grouped-gemm-backend", backend, "--save", str(tmp_path / backend)])
        assert f"experts {backend})" in proc.stdout  # the model summary names the experts built
        runs[backend] = read_metrics(log)
    losses = {b: [r["lm loss"] for r in rows] for b, rows in runs.items()}
    assert len(losses["triton"]) == 3
    assert losses["triton"] == pytest.approx(losses["sequential"], rel=1e-5)
    saved = {b: read_model_tensors(str(tmp_path / b)) for b in runs}
    assert saved["triton"].keys() == saved["sequential"].keys()
    for key, tensor in saved["sequential"].items():
        torch.testing.assert_close(saved["triton"][key], tensor, rtol=1e-4, atol=1e-6, msg=key)
    # resume each backend from the other's checkpoint (model and optimizer state)
    resumed = {}
    for backend, source in (("sequential", "triton"), ("triton", "sequential")):
        rows = pretrain(tmp_path, f"{backend}-from-{source}",
                        steps + ["--train-iters", "4", "--moe-grouped-gemm-backend", backend,
                                 "--load", str(tmp_path / source)])
        resumed[backend] = [r["lm loss"] for r in rows]
    assert len(resumed["triton"]) == 1  # step 4 only
    assert resumed["triton"] == pytest.approx(resumed["sequential"], rel=1e-5)



def test_auto_measures_and_reports_its_choice(tmp_path: Path):
    log = tmp_path / "auto.jsonl"
    proc = run_cli(["pretrain", *TINY_MODEL, *MOCK, "--train-iters", "2", "--log-file", str(log),
                    "--moe-grouped-gemm-backend", "auto", "--expert-model-parallel-size", "2"], nproc=2)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("experts: "))
    chosen = line.split()[1]
    assert chosen in ("torch", "sequential") and f"experts {chosen})" in proc.stdout
    assert "auto, measured fwd+bwd on rank 0: " in line and "torch" in line and "sequential" in line
    assert read_metrics(log)
