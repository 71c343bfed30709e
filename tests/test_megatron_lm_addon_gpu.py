"""Megatron-LM's own loop on a GPU: ``moe-reg megatron-lm`` (or, with MEGATRON_LM_PATH, the checkout's
pretrain_gpt.py) trains a tiny GPT-MoE in bf16 with the plugin's losses and a plugin router and
reports them. Needs CUDA and Megatron-LM's megatron.training (skipped otherwise); on a machine
without TransformerEngine or Apex the entry turns their fusions off itself."""

import pytest
import torch

from helpers import MEGATRON_LM_MODEL, megatron_lm_available, megatron_lm_losses, plugin_lines, run_megatron_lm

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or not megatron_lm_available(),
                                 reason="needs CUDA and megatron.training (megatron-core 0.19+ or MEGATRON_LM_PATH)")]


def test_megatron_lm_with_the_plugin_trains_and_reports_its_losses(tmp_path):
    proc = run_megatron_lm([*MEGATRON_LM_MODEL, "--bf16", "--train-iters", "4", "--log-interval", "2",
                            "--moe-token-dispatcher-type", "alltoall", "--moe-specialization-loss-coeff", "2e-3",
                            "--moe-coupling-loss-coeff", "1e-3", "--moe-router-type", "spectral",
                            "--save", str(tmp_path / "ck"), "--save-interval", "4"], timeout=900)
    values = plugin_lines(proc.stdout)
    assert sorted(values) == [2, 4]
    assert all("specialization_loss" in v and "coupling_loss" in v for v in values.values())
    assert sorted(megatron_lm_losses(proc.stdout)) == [2, 4]
    assert (tmp_path / "ck" / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
