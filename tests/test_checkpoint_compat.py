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
