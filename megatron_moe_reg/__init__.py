"""megatron-moe-reg: MoE regularization losses, routers, grouped-GEMM experts and routing
analysis for NVIDIA Megatron-Core, as flags on an ordinary Megatron run.

Importing this package does not import TransformerEngine, apex or triton.
"""

__version__ = "0.1.0"
