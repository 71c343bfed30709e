"""On a CUDA device: R_sp's compiled Triton Gram kernels against the torch path, fp32 and bf16
rows, the loss and every row gradient. Skipped without CUDA."""

import pytest
import torch

from megatron_moe_reg.losses.specialization_rows import (
    mean_weights,
    permuted_pairs,
    slot_of,
    specialization_loss_from_rows,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,experts,k,width", [(4096, 64, 8, 1408), (2048, 8, 2, 4096)])
def test_compiled_gram_kernels_match_torch(dtype, tokens, experts, k, width):
    pytest.importorskip("triton")
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(tokens, experts, device="cuda", generator=g)
    routing_map = torch.zeros(tokens, experts, dtype=torch.bool, device="cuda")
    routing_map.scatter_(1, logits.topk(k).indices, True)
    n = tokens * k
    token, expert = permuted_pairs(routing_map, n)
    positions = token * k + slot_of(routing_map, token, expert)
    weights = mean_weights(torch.ones(tokens, dtype=torch.bool, device="cuda"))
    base = torch.randn(n, width, device="cuda", generator=g).to(dtype)
    out = {}
    for kernel in ("torch", "triton"):
        rows = base.clone().requires_grad_()
        loss = specialization_loss_from_rows([rows], positions, weights, k, complete=True, kernel=kernel)
        loss.backward()
        out[kernel] = (loss.detach().float(), rows.grad.float())
    assert torch.allclose(out["torch"][0], out["triton"][0], rtol=1e-4)
    scale = out["torch"][1].abs().max()
    assert (out["torch"][1] - out["triton"][1]).abs().max() <= 1e-3 * scale
