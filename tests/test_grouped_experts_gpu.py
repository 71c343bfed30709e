"""On a CUDA device: the compiled Triton kernels and torch._grouped_mm against the per-expert
reference, fp32 (IEEE) and bf16, forward and every gradient. Skipped without CUDA."""

import pytest
import torch

from megatron_moe_reg.experts import backend_unavailable_reason, grouped_mlp_with_activation

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SHAPES = {  # rows per expert, hidden, ffn
    "uneven-empty": ([0, 300, 17, 0, 1029, 64, 5, 2], 512, 384),
    "fine-e64": ([0 if e % 9 == 0 else 40 + 13 * (e % 7) for e in range(64)], 256, 192),
}
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # of the reference's largest magnitude


def _run(backend, counts, hidden, ffn, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = sum(counts)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=g) * scale).to(dtype).requires_grad_()

    x = rand(rows, hidden)
    fc1 = [rand(2 * ffn, hidden, scale=hidden ** -0.5) for _ in counts]
    fc2 = [rand(hidden, ffn, scale=ffn ** -0.5) for _ in counts]
    probs = torch.rand(rows, device="cuda", generator=g).requires_grad_()
    y, z = grouped_mlp_with_activation(x, torch.tensor(counts), fc1, fc2, probs, backend=backend)
    dy = torch.randn(y.shape, device="cuda", generator=g).to(dtype)
    dz = torch.randn(z.shape, device="cuda", generator=g).to(dtype)
    grads = torch.autograd.grad((y.float() * dy.float()).sum() + (z.float() * dz.float()).sum(),
                                [x, probs, *fc1, *fc2])
    return [y, z, *grads]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_backend_matches_fp32_reference_on_gpu(backend, shape, dtype):
    if backend_unavailable_reason(backend, torch.device("cuda")) is not None:
        pytest.skip(backend_unavailable_reason(backend, torch.device("cuda")))
    if backend == "torch" and dtype != torch.bfloat16:
        pytest.skip("torch._grouped_mm runs bf16 on CUDA")
    counts, hidden, ffn = SHAPES[shape]
    torch.backends.cuda.matmul.allow_tf32 = False
    expected = _run("sequential", counts, hidden, ffn, torch.float32)
    got = _run(backend, counts, hidden, ffn, dtype)
    for i, (a, b) in enumerate(zip(got, expected, strict=False)):
        scale = b.abs().max().item()
        err = (a.float() - b).abs().max().item()
        assert err <= TOLERANCE[dtype] * max(scale, 1e-6), (backend, shape, i, err, scale)
