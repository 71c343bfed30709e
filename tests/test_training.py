"""End to end on one process: loss falls on the embedded corpus; save -> resume is exact."""

import math

import pytest

from helpers import MOCK, TINY_MODEL, data_flags, pretrain, read_validation, run_cli, without

pytestmark = pytest.mark.compat

def test_loss_falls_on_embedded_corpus(embedded_dataset, tmp_path):
    rows = pretrain(tmp_path, "train", ["--train-iters", "40", "--lr", "3e-3", "--lr-warmup-iters", "5",
                                        "--micro-batch-size", "8", "--seq-length", "64",
                                        "--eval-iters", "2", "--eval-interval", "20",
                                        "--tensorboard-dir", str(tmp_path / "tb")],
                    data=data_flags(embedded_dataset),
                    model=without(TINY_MODEL, "--vocab-size", "--eval-iters"))
    losses = [r["lm loss"] for r in rows]
    assert len(losses) == 40
    first, last = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert last < first - 1.0, losses  # ln(1024) = 6.9 at the start
    assert all(1.0 - 1e-6 <= r["load_balancing_loss"] < 2.0 for r in rows)
    valid = read_validation(tmp_path / "train.jsonl")
    assert len(valid) == 2 and valid[-1]["validation loss"] < valid[0]["validation loss"]
    assert valid[-1]["validation ppl"] == pytest.approx(math.exp(valid[-1]["validation loss"]), rel=1e-9)
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events, "TensorBoard event file written"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"lm loss", "load_balancing_loss", "moe/load_balancing_loss_layer_0",
            "moe/load_balancing_loss_layer_1", "validation/lm loss", "validation/perplexity"} <= tags
    # the plugin's quantities are measured (no gradient) at every log interval, per layer
    assert {"moe_reg/specialization_loss", "moe_reg/specialization_loss_layer_1",
            "moe_reg/coupling_loss", "moe_reg/coupling_loss_layer_1"} <= tags
    assert all(0.0 <= r["specialization_loss"] <= 2.0 and -1.0 <= r["coupling_loss"] <= 0.0 for r in rows)


def test_resume_continues_with_identical_losses(tmp_path):
    common = ["--train-iters", "6", "--lr-decay-iters", "6", "--moe-z-loss-coeff", "1e-3"]
    straight = pretrain(tmp_path, "straight", common)
    first = pretrain(tmp_path, "first", common + ["--exit-interval", "3", "--save-interval", "2",
                                                  "--save", str(tmp_path / "ck")])
    resumed = pretrain(tmp_path, "resumed", common + ["--load", str(tmp_path / "ck")])
    from_step_2 = pretrain(tmp_path, "from2", common + ["--load", str(tmp_path / "ck"), "--ckpt-step", "2"])
    assert [r["iteration"] for r in first] == [1, 2, 3]
    assert [r["iteration"] for r in resumed] == [4, 5, 6]
    assert [r["iteration"] for r in from_step_2] == [3, 4, 5, 6]
    for a, b in list(zip(straight, first + resumed, strict=False)) + list(zip(straight[2:], from_step_2, strict=False)):
        for key in ("lm loss", "grad norm", "load_balancing_loss", "z_loss", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (key, a, b)
    assert (tmp_path / "ck" / "latest_checkpointed_iteration.txt").read_text() == "3"
    proc = run_cli(["pretrain", *TINY_MODEL, *MOCK, *common, "--load", str(tmp_path / "ck"), "--ckpt-step", "5"],
                   check=False)
    assert proc.returncode == 2 and "--ckpt-step 5: " in proc.stderr and "iter_0000005 is missing or partial; " \
        "the newest complete one is 3" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_load_refuses_a_checkpoint_of_another_architecture(tmp_path):
    pretrain(tmp_path, "a", ["--train-iters", "2", "--save", str(tmp_path / "ck")])
    proc = run_cli(["pretrain", *TINY_MODEL, *MOCK, "--train-iters", "3", "--num-experts", "8",
                    "--load", str(tmp_path / "ck")], check=False)
    assert proc.returncode == 2
    assert "the checkpoint was written with --num-experts 4, this run has 8" in proc.stderr
    assert "Traceback" not in proc.stderr
