"""Megatron-LM's pretrain_gpt.py with megatron-moe-reg's flags.

Run it from the root of a Megatron-LM checkout (tags core_v0.16.x to core_v0.19.x), exactly as you
run pretrain_gpt.py, adding any plugin flag:

    cd Megatron-LM
    torchrun --nproc-per-node 8 /path/to/megatron-moe-reg/patches/pretrain_gpt_moe_reg.py \\
        <your pretrain_gpt.py flags> --moe-specialization-loss-coeff 2e-3 --moe-coupling-loss-coeff 1e-3

It runs the checkout's pretrain_gpt.py as its __main__; what it changes in Megatron-LM while it
runs is listed in megatron_moe_reg/integration/megatron/patches.py (scopes megatron-lm and
megatron-lm-cpu).
"""

import sys

from megatron_moe_reg.errors import quiet_third_party_warnings, run_guarded
from megatron_moe_reg.integration.megatron_lm.entry import run_checkout

if __name__ == "__main__":
    quiet_third_party_warnings()
    sys.exit(run_guarded(run_checkout, sys.argv[1:]))
