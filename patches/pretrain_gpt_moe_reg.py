"""Megatron-LM's pretrain_gpt.py with megatron-moe-reg's flags.

Run it from the root of a Megatron-LM checkout (where pretrain_gpt.py is), exactly as you run
pretrain_gpt.py, adding any plugin flag:

    cd Megatron-LM
    torchrun --nproc-per-node 8 /path/to/megatron-moe-reg/patches/pretrain_gpt_moe_reg.py \\
        <your pretrain_gpt.py flags> --moe-specialization-loss-coeff 2e-3 --moe-coupling-loss-coeff 1e-3

What it changes in Megatron-LM while it runs is listed in megatron_moe_reg/integration/megatron_lm.py.
"""

import os
import sys

sys.path.insert(0, os.getcwd())  # the Megatron-LM checkout: pretrain_gpt.py, gpt_builders.py, model_provider.py

from megatron_moe_reg.integration.megatron_lm import run_pretrain_gpt  # noqa: E402  # after the checkout joins sys.path

if __name__ == "__main__":
    run_pretrain_gpt()
