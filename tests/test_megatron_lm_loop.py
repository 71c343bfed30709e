"""Megatron-LM's own pretrain() loop trains a tiny GPT-MoE with the plugin (R_sp, R_cp and the
spectral router on), in one process and in two (EP 2 alltoall with the distributed optimizer,
TP 2 + SP, PP 2): the loss falls, the plugin's per-layer metrics reach Megatron-LM's log,
TensorBoard and W&B (offline), and a run resumed from a checkpoint continues exactly.

It runs ``moe-reg megatron-lm`` (megatron-core 0.19+ ships ``megatron.training``: the 0.19.2 pass of
tests/run.sh), or, with MEGATRON_LM_PATH, the checkout's pretrain_gpt.py through
patches/pretrain_gpt_moe_reg.py."""

from __future__ import annotations

import os

import pytest

from helpers import (
    CHECKOUT,
    MEGATRON_LM_MODEL,
    checkpoint_tensors,
    megatron_lm_available,
    megatron_lm_losses,
    plugin_lines,
    run_cli,
    run_megatron_lm,
)

pytestmark = [
    pytest.mark.compat,
    pytest.mark.multiprocess,
    pytest.mark.skipif(not megatron_lm_available(), reason="needs megatron-core 0.19+ (megatron.training) or "
                       "MEGATRON_LM_PATH"),
]

PLUGIN = ["--moe-specialization-loss-coeff", "1e-2", "--moe-coupling-loss-coeff", "1e-2",
          "--moe-router-type", "spectral"]
NO_COMPILE = ["--no-bias-swiglu-fusion"]  # torch.compile of the fused SwiGLU: in one run only (EP 2)
RESUMABLE = [*MEGATRON_LM_MODEL, *PLUGIN, *NO_COMPILE, "--train-iters", "6", "--lr-decay-style", "constant",
             "--save-interval", "3", "--use-distributed-optimizer"]
LAYOUTS = {
    "ep2-alltoall-distributed-optimizer": ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type",
                                           "alltoall", "--use-distributed-optimizer"],
    "tp2-sp": ["--tensor-model-parallel-size", "2", "--sequence-parallel", *NO_COMPILE],
    "pp2": ["--pipeline-model-parallel-size", "2", *NO_COMPILE],
}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process with the distributed optimizer, 6 steps, checkpoints at 3 and 6, TensorBoard and W&B
    (offline)."""
    out = tmp_path_factory.mktemp("megatron_lm")
    proc = run_megatron_lm([*RESUMABLE, "--save", str(out / "ck"), "--tensorboard-dir", str(out / "tb"),
                            "--wandb-project", "moe-reg-test", "--wandb-exp-name", "single",
                            "--wandb-save-dir", str(out / "wandb")], env={"WANDB_MODE": "offline"})
    return out, proc


def test_one_process_trains_and_reports_everywhere(single):
    out, proc = single
    losses, values = megatron_lm_losses(proc.stdout), plugin_lines(proc.stdout)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and losses[6] < losses[1] - 0.05, losses
    assert sorted(values) == [1, 2, 3, 4, 5, 6]
    assert all({"specialization_loss", "coupling_loss", "routing_entropy"} <= v.keys() for v in values.values())
    assert all(v["specialization_loss"] > 0 and v["coupling_loss"] < 0 for v in values.values())
    assert "moe-reg: megatron-core " in proc.stdout  # the version and path in use
    assert "router spectral (SpectralRouter)" in proc.stdout and "regularizers specialization, coupling" in proc.stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"moe_reg/specialization_loss", "moe_reg/coupling_loss_layer_1", "moe_reg/routing_entropy"} <= tags
    assert [e.step for e in events.Scalars("moe_reg/specialization_loss")] == [1, 2, 3, 4, 5, 6]
    runs = list((out / "wandb").rglob("run-*.wandb"))
    assert len(runs) == 1
    recorded = runs[0].read_bytes()  # W&B's offline record log holds each logged key by name
    assert b"moe_reg/specialization_loss" in recorded and b"moe_reg/coupling_loss_layer_1" in recorded


def test_a_resumed_run_continues_exactly(single):
    """Resumed at step 3: the plugin's values of steps 4-6, Megatron-LM's loss of step 4 (its later
    lines average the steps since the start of a process) and every weight and buffer saved at step 6
    equal the uninterrupted run's. (The distributed optimizer's flat state buffers carry uninitialized
    padding, so its moments count through their effect on the three steps after the resume.)"""
    import torch

    out, straight = single
    resumed = run_megatron_lm([*RESUMABLE, "--load", str(out / "ck"), "--ckpt-step", "3", "--save",
                               str(out / "resumed")])
    assert "Adam step, which this checkpoint does not hold" in resumed.stdout  # restored from the iteration
    first, second = plugin_lines(straight.stdout), plugin_lines(resumed.stdout)
    assert sorted(second) == [4, 5, 6]
    assert all(second[i] == first[i] for i in second), {i: (first[i], second[i]) for i in second}
    assert megatron_lm_losses(resumed.stdout)[4] == megatron_lm_losses(straight.stdout)[4]
    a = checkpoint_tensors(out / "ck" / "iter_0000006")
    b = checkpoint_tensors(out / "resumed" / "iter_0000006")
    model = [k for k in a if "optimizer" not in k]
    assert any("router.weight" in k for k in model) and any("power_u" in k for k in model)
    assert any(k.endswith(".exp_avg_sq") for k in a)  # the optimizer state is in the checkpoint
    assert [k for k in model if not torch.equal(a[k], b[k])] == []


@pytest.fixture(scope="module")
def two_process_runs():
    """Runs of two processes by layout, 8 steps each (shared between tests)."""
    runs: dict = {}

    def run(layout: str):
        if layout not in runs:
            runs[layout] = run_megatron_lm([*MEGATRON_LM_MODEL, *PLUGIN, "--train-iters", "8", *LAYOUTS[layout]],
                                           nproc=2)
        return runs[layout]

    return run


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_processes_train_with_the_plugin(layout, two_process_runs):
    proc = two_process_runs(layout)
    losses, values = megatron_lm_losses(proc.stdout), plugin_lines(proc.stdout)
    assert sorted(losses) == list(range(1, 9)) and losses[8] < losses[1] - 0.05, losses
    assert sorted(values) == list(range(1, 9))
    assert all({"specialization_loss_layer_0", "specialization_loss_layer_1", "coupling_loss_layer_1"} <= v.keys()
               for v in values.values())  # PP 2: the coupling pair straddles the stage boundary
    assert "Traceback" not in proc.stderr


def test_two_node_agents_on_loopback_reproduce_the_two_process_run(two_process_runs, tmp_path):
    """Two torchrun agents of one process each, meeting by c10d rendezvous on 127.0.0.1, each in its
    own working directory: the plugin's values equal the single-node run's, step by step."""
    import socket
    import subprocess
    import sys

    from helpers import ROOT, child_env

    reference = two_process_runs("ep2-alltoall-distributed-optimizer")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = [*MEGATRON_LM_MODEL, *PLUGIN, "--train-iters", "8", *LAYOUTS["ep2-alltoall-distributed-optimizer"]]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
              "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "addon"]
    if CHECKOUT:
        command = [*launch, str(ROOT / "patches" / "pretrain_gpt_moe_reg.py"), *flags]
    else:
        command = [*launch, "-m", "megatron_moe_reg.cli", "megatron-lm", *flags]
    cwd = [CHECKOUT or tmp_path / f"node{n}" for n in range(2)]
    for directory in cwd:
        os.makedirs(directory, exist_ok=True)
    nodes = [subprocess.Popen(command, cwd=directory, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for directory in cwd]
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), [err[-3000:] for _, err in outputs]
    values = {**plugin_lines(outputs[0][0]), **plugin_lines(outputs[1][0])}  # the last rank prints them
    assert values == plugin_lines(reference.stdout)


@pytest.mark.skipif(bool(CHECKOUT), reason="moe-reg megatron-lm runs the installed megatron.training")
def test_bad_plugin_flags_stop_before_megatron_lm_starts():
    proc = run_cli(["megatron-lm", *MEGATRON_LM_MODEL, "--train-iters", "1", "--moe-coupling-loss-coeff", "-1"],
                   check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == "moe-reg: error: --moe-coupling-loss-coeff must be >= 0, got -1.0"
    assert "using world size" not in proc.stdout  # Megatron-LM's initialization never started
