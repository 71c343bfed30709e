"""Checkpoints written by other runs: added penalties restart their vectors; other changes are errors."""

import pytest

from helpers import MOCK, TINY_MODEL, pretrain, run_cli

pytestmark = pytest.mark.compat


def test_penalties_added_on_resume_restart_their_power_vectors(tmp_path):
    pretrain(tmp_path, "baseline", ["--train-iters", "2", "--save", str(tmp_path / "ck")])
    proc = run_cli(["pretrain", *TINY_MODEL, *MOCK, "--train-iters", "3", "--load", str(tmp_path / "ck"),
                    "--moe-router-stable-rank-coeff", "1e-2", "--log-file", str(tmp_path / "r.jsonl")])
    assert "power-iteration vectors are not in the checkpoint" in proc.stdout
    assert "loaded checkpoint" in proc.stdout and (tmp_path / "r.jsonl").read_text().count("iteration") == 1


def test_another_router_type_is_refused(tmp_path):
    pretrain(tmp_path, "baseline", ["--train-iters", "2", "--save", str(tmp_path / "ck")])
    proc = run_cli(["pretrain", *TINY_MODEL, *MOCK, "--train-iters", "3", "--load", str(tmp_path / "ck"),
                    "--moe-router-type", "spectral"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "written with --moe-router-type topk, this run has spectral" in proc.stderr


def test_a_checkpoint_of_the_earlier_layout_still_resumes_exactly(tmp_path):
    """tests/data/checkpoint_v1: written at step 2 by moe-reg pretrain before its checkpoints took
    Megatron-LM's layout (flat optimizer tensors, per-rank RNG, scheduler in steps); step 3 after
    loading it is the step that layout's own resume computed then (checkpoint_v1.json)."""
    import json
    import math
    import shutil

    from helpers import DATA, read_metrics

    expected = json.loads((DATA / "checkpoint_v1.json").read_text())
    shutil.copytree(DATA / "checkpoint_v1", tmp_path / "ck")
    log = tmp_path / "r.jsonl"
    run_cli(["pretrain", *TINY_MODEL, *MOCK, *expected["flags"], "--load",
             str(tmp_path / "ck"), "--log-file", str(log)])
    (step,) = read_metrics(log)
    assert step["iteration"] == expected["iteration"]
    assert step["lm loss"] == expected["lm loss"] and step["grad norm"] == expected["grad norm"]
    assert math.isclose(step["lr"], expected["lr"], rel_tol=1e-12)  # its scheduler counted steps, ours samples


def test_a_checkpoint_of_megatron_core_0_19_on_an_older_release_is_one_line(tmp_path):
    """megatron-core 0.19 keeps the common state inside the torch_dist files (no common.pt)."""
    from megatron.core import package_info

    if tuple(int(p) for p in package_info.__version__.split(".")[:2]) >= (0, 19):
        pytest.skip("this megatron-core reads such checkpoints")
    iteration = tmp_path / "ck" / "iter_0000002"
    iteration.mkdir(parents=True)
    (iteration / ".metadata").write_bytes(b"")
    (iteration / "metadata.json").write_text('{"sharded_backend": "torch_dist", "sharded_backend_version": 1}')
    (tmp_path / "ck" / "latest_checkpointed_iteration.txt").write_text("2")
    proc = run_cli(["pretrain", *TINY_MODEL, *MOCK, "--train-iters", "3", "--load", str(tmp_path / "ck")],
                   check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "written by megatron-core 0.19 or newer" in proc.stderr and "megatron-core 0.19+" in proc.stderr
