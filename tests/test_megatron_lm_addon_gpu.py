"""The Megatron-LM add-on end to end: patches/pretrain_gpt_moe_reg.py trains a tiny GPT-MoE with
Megatron-LM's own pretrain loop and the plugin's losses. Needs CUDA and a Megatron-LM checkout
named by MEGATRON_LM_PATH (skipped otherwise)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or not os.environ.get("MEGATRON_LM_PATH"),
                                 reason="needs CUDA and MEGATRON_LM_PATH")]

ENTRY = Path(__file__).parents[1] / "patches" / "pretrain_gpt_moe_reg.py"
FLAGS = ["--num-layers", "2", "--hidden-size", "128", "--num-attention-heads", "4", "--seq-length", "128",
         "--max-position-embeddings", "128", "--micro-batch-size", "2", "--global-batch-size", "4",
         "--train-iters", "4", "--lr", "3e-4", "--swiglu", "--normalization", "RMSNorm",
         "--position-embedding-type", "rope", "--disable-bias-linear", "--num-experts", "4",
         "--moe-router-topk", "2", "--moe-aux-loss-coeff", "1e-2", "--moe-token-dispatcher-type", "alltoall",
         "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "1024", "--bf16",
         "--log-interval", "2", "--eval-iters", "0", "--transformer-impl", "local",
         "--moe-specialization-loss-coeff", "2e-3", "--moe-coupling-loss-coeff", "1e-3",
         "--moe-router-type", "spectral"]


def test_pretrain_gpt_with_the_plugin_reports_its_losses(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", str(ENTRY),
           *FLAGS, "--save", str(tmp_path / "ck"), "--save-interval", "4"]
    proc = subprocess.run(cmd, cwd=os.environ["MEGATRON_LM_PATH"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    lines = [x for x in proc.stdout.splitlines() if "moe-reg | iteration" in x]
    assert [x.split("iteration ")[1].split(" ")[0] for x in lines] == ["2", "4"]
    assert all("specialization_loss" in x and "coupling_loss" in x for x in lines)
    assert (tmp_path / "ck" / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
