"""R_sp from rows in Megatron's permuted order (the Gram autograd function) against the assembled
z_TKF formula; the permuted order against Megatron's own ``permute``; the token subsample."""

import pytest
import torch
from megatron.core.transformer.moe.moe_utils import permute

from megatron_moe_reg.integration.regularizers.token_sample import sample_count, token_sample
from megatron_moe_reg.losses.specialization import specialization_loss
from megatron_moe_reg.losses.specialization_rows import (
    mean_weights,
    permuted_pairs,
    slot_of,
    specialization_loss_from_rows,
)


def _routing(tokens=12, experts=6, k=3, drop=(2, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=g)
    routing_map = torch.zeros(tokens, experts, dtype=torch.bool)
    routing_map.scatter_(1, logits.topk(k).indices, True)
    for t in drop:  # capacity dropping: tokens with fewer than k experts
        routing_map[t, routing_map[t].nonzero()[0]] = False
    return routing_map


def test_permuted_pairs_follow_megatrons_permute():
    routing_map = _routing()
    tokens = torch.arange(routing_map.shape[0], dtype=torch.float32)[:, None].expand(-1, 2).contiguous()
    out = permute(tokens, routing_map, num_out_tokens=int(routing_map.sum()))
    token, expert = permuted_pairs(routing_map, int(routing_map.sum()))
    assert torch.equal(token, out[0][:, 0].long())
    assert torch.equal(token, out[2])  # Megatron's own row -> token map
    assert routing_map[token, expert].all()
    assert torch.equal(expert, torch.sort(expert, stable=True).values)  # expert-major


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_rows_loss_and_gradients_equal_the_assembled_formula(dtype):
    routing_map, k = _routing(), 3
    n = int(routing_map.sum())
    token, expert = permuted_pairs(routing_map, n)
    slot = slot_of(routing_map, token, expert)
    rows = torch.randn(n, 8, dtype=torch.float64)
    rows[5] = 0.0  # a zero row: cosine 0
    rows = rows.to(dtype).requires_grad_()
    keep = torch.ones(routing_map.shape[0], dtype=torch.bool)
    keep[[0, 9]] = False
    chunks = list(torch.split(rows, routing_map.sum(0).tolist()))  # one chunk per expert
    loss = specialization_loss_from_rows(chunks, token * k + slot, mean_weights(keep, torch.float64), k)
    ref_rows = rows.detach().clone().requires_grad_()
    z = torch.zeros(routing_map.shape[0], k, 8, dtype=dtype).index_put((token, slot), ref_rows)
    ref = specialization_loss(z, keep)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert loss.item() == pytest.approx(ref.item(), rel=tol * 10, abs=tol)
    loss.backward()
    ref.backward()
    assert torch.allclose(rows.grad.double(), ref_rows.grad.double(), atol=1e-2 if dtype == torch.bfloat16 else tol)


def test_rows_loss_passes_gradcheck_and_drops_trash_rows():
    routing_map, k = _routing(tokens=6, experts=4, k=2, drop=(1,)), 2
    n = int(routing_map.sum())
    token, expert = permuted_pairs(routing_map, n)
    positions = token * k + slot_of(routing_map, token, expert)
    weights = mean_weights(torch.ones(6, dtype=torch.bool), torch.float64)
    rows = torch.randn(n, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r: specialization_loss_from_rows([r], positions, weights, k), (rows,))
    dropped = torch.where(token == 3, torch.full_like(positions, 6 * k), positions)
    loss = specialization_loss_from_rows([rows], dropped, weights, k)
    z = torch.zeros(6, k, 5, dtype=torch.float64).index_put((token, positions % k), rows.detach())
    z[3] = 0.0
    assert loss.item() == pytest.approx(specialization_loss(z).item(), rel=1e-12)
    loss.backward()
    assert rows.grad[token == 3].abs().sum() == 0


def test_token_sample_is_evenly_spaced_and_split_by_rank():
    total, n = 64, 10
    whole = token_sample(total, n, 0, total, "cpu").indices
    assert whole.tolist() == [i * total // n for i in range(n)]
    parts = [token_sample(total, n, r * 16, 16, "cpu") for r in range(4)]
    assert torch.cat([p.indices + r * 16 for r, p in enumerate(parts)]).tolist() == whole.tolist()
    assert [p.size for p in parts] == [sample_count(total, n, r * 16, 16) for r in range(4)]
    for p in parts:
        assert (p.sample_index[p.indices] == torch.arange(p.size)).all()
        assert (p.sample_index >= 0).sum() == p.size
    assert token_sample(total, 100, 0, total, "cpu").size == total  # N >= M: every token


def test_fused_triton_kernels_match_the_torch_path():
    """The Gram kernels in Triton's interpreter against the torch path: loss, its no-grad value and
    every row gradient; S = 3 (padded to 4), a dropped token, a row in no slot (zero gradient), a
    zero row and an F that is not a block multiple, in chunks; bf16 rows in one chunk."""
    import os
    import subprocess
    import sys
    import textwrap

    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        from megatron_moe_reg.losses.specialization_rows import *
        g = torch.Generator().manual_seed(3)
        for tokens, experts, k, width, dtype, sparse in [(9, 5, 3, 37, torch.float32, True),
                                                         (16, 8, 2, 40, torch.bfloat16, False)]:
            logits = torch.randn(tokens, experts, generator=g)
            rm = torch.zeros(tokens, experts, dtype=torch.bool)
            rm.scatter_(1, logits.topk(k).indices, True)
            if sparse:
                rm[4, rm[4].nonzero()[0]] = False
            n = int(rm.sum())
            token, expert = permuted_pairs(rm, n)
            positions = token * k + slot_of(rm, token, expert)
            if sparse:
                positions[5] = tokens * k  # a row outside every slot
            keep = torch.ones(tokens, dtype=torch.bool); keep[7] = False
            w = mean_weights(keep)
            base = torch.randn(n, width, generator=g).to(dtype); base[2] = 0.0
            out = {}
            for kernel in ("torch", "triton"):
                rows = base.clone().requires_grad_()
                chunks = list(torch.split(rows, rm.sum(0).tolist())) if sparse else [rows]
                loss = specialization_loss_from_rows(chunks, positions, w, k, kernel=kernel, complete=not sparse)
                (2.5 * loss).backward()
                with torch.no_grad():
                    value = specialization_loss_from_rows(chunks, positions, w, k, kernel=kernel)
                out[kernel] = (loss.detach(), rows.grad.float(), value)
            assert torch.allclose(out["torch"][0], out["triton"][0], rtol=1e-5), out
            assert torch.allclose(out["triton"][0], out["triton"][2], rtol=1e-6), out
            assert torch.allclose(out["torch"][1], out["triton"][1], rtol=1e-4, atol=1e-6)
            assert not sparse or (out["triton"][1][5] == 0).all()
        print("ok", float(out["triton"][0]))
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
