"""R_sp and R_cp functional API against naive per-token loops, gradcheck (float64), edge cases."""

import itertools
import math

import pytest
import torch

from megatron_moe_reg.losses import coupling_loss, routing_distribution, specialization_loss
from megatron_moe_reg.losses.specialization import pairwise_cos2_from_gram


def naive_specialization(z, mask=None):
    total, count = 0.0, 0
    for i in range(z.shape[0]):
        if mask is not None and not mask[i]:
            continue
        term = 0.0
        for e, v in itertools.permutations(range(z.shape[1]), 2):  # ordered pairs e != v
            a, b = z[i, e].double(), z[i, v].double()
            na, nb = a.norm().item(), b.norm().item()
            cos = 0.0 if na == 0 or nb == 0 else (a @ b).item() / (na * nb)
            term += cos * cos
        total, count = total + term, count + 1
    return total / count if count else 0.0


def naive_coupling(s_prev, s, k, mask=None, variant="product"):
    vals = []
    for i in range(s.shape[0]):
        if mask is not None and not mask[i]:
            continue
        m_prev = sorted(s_prev[i].tolist(), reverse=True)[:k]
        m = sorted(s[i].tolist(), reverse=True)[:k]
        joint = sum(a * b for a in m_prev for b in m)  # Σ_{e∈TopK_l⁻} Σ_{ν∈TopK_l} s s
        vals.append(-joint if variant == "product" else -math.log(joint))
    return sum(vals) / len(vals) if vals else 0.0


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_specialization_matches_naive_loop(k):
    g = torch.Generator().manual_seed(k)
    z = torch.randn(13, k, 24, generator=g)
    z[3, 0] = 0.0  # a dead expert activation: cosine 0
    mask = torch.rand(13, generator=g) > 0.3
    assert specialization_loss(z).item() == pytest.approx(naive_specialization(z), rel=1e-5, abs=1e-7)
    assert specialization_loss(z, mask).item() == pytest.approx(naive_specialization(z, mask), rel=1e-5, abs=1e-7)


def test_specialization_bounds_and_edge_cases():
    t, k, f = 5, 3, 16
    same = torch.randn(t, 1, f).expand(t, k, f)
    assert specialization_loss(same).item() == pytest.approx(k * (k - 1), rel=1e-5)  # identical: cos² = 1
    ortho = torch.eye(f)[:k].expand(t, k, f)
    assert specialization_loss(ortho).item() == pytest.approx(0.0, abs=1e-7)
    zeros = torch.zeros(t, k, f, requires_grad=True)
    loss = specialization_loss(zeros)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert torch.isfinite(zeros.grad).all()
    assert specialization_loss(torch.randn(t, k, f), torch.zeros(t, dtype=torch.bool)).item() == 0.0
    assert specialization_loss(torch.randn(0, k, f)).item() == 0.0
    assert specialization_loss(torch.randn(t, 1, f)).item() == 0.0  # top-1: no pairs


def test_specialization_is_fp32_for_bf16_inputs():
    z = torch.randn(32, 2, 64)
    out = specialization_loss(z.bfloat16())
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(specialization_loss(z.bfloat16().float()).item(), rel=1e-6)


def test_specialization_gradcheck():
    z = torch.randn(6, 3, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda x: specialization_loss(x, mask), (z,))


def test_gram_form_equals_direct_form_and_sums_over_shards():
    z = torch.randn(7, 4, 32, dtype=torch.float64)
    direct = specialization_loss(z)
    gram = sum(zs @ zs.transpose(-1, -2) for zs in z.chunk(4, dim=-1))  # ffn sharded 4 ways
    assert pairwise_cos2_from_gram(gram).mean().item() == pytest.approx(direct.item(), rel=1e-6)


@pytest.mark.parametrize("variant", ["product", "log"])
def test_coupling_matches_naive_loop(variant):
    g = torch.Generator().manual_seed(0)
    s_prev = torch.softmax(torch.randn(11, 8, generator=g), -1)
    s = torch.softmax(torch.randn(11, 8, generator=g), -1)
    mask = torch.rand(11, generator=g) > 0.4
    for m in (None, mask):
        got = coupling_loss(s_prev, s, 2, m, variant).item()
        assert got == pytest.approx(naive_coupling(s_prev, s, 2, m, variant), rel=1e-5)


def test_coupling_uses_the_routed_experts_when_given():
    s = torch.softmax(torch.randn(4, 6), -1)
    routed = torch.zeros(4, 6, dtype=torch.bool)
    routed[:, :2] = True  # e.g. chosen with an expert bias, not the top-2 of the scores
    expected = -(s[:, :2].sum(-1) * s[:, :2].sum(-1)).mean()
    got = coupling_loss(s, s, 2, routing_map_prev_TE=routed, routing_map_TE=routed)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_coupling_gradcheck_reaches_both_layers():
    logits_prev = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    for variant in ("product", "log"):
        assert torch.autograd.gradcheck(
            lambda a, b, variant=variant: coupling_loss(torch.softmax(a, -1), torch.softmax(b, -1), 2,
                                                        variant=variant),
            (logits_prev, logits))
    coupling_loss(torch.softmax(logits_prev, -1), torch.softmax(logits, -1), 2).backward()
    assert logits_prev.grad.abs().sum() > 0 and logits.grad.abs().sum() > 0


def test_coupling_edge_cases_and_normalization():
    s = torch.softmax(torch.randn(3, 4), -1)
    assert coupling_loss(s, s, 2, torch.zeros(3, dtype=torch.bool)).item() == 0.0
    assert coupling_loss(s.bfloat16(), s.bfloat16(), 2).dtype == torch.float32
    with pytest.raises(ValueError, match="unknown coupling variant"):
        coupling_loss(s, s, 2, variant="sum")
    for fn in ("softmax", "sigmoid", "sqrtsoftplus"):
        dist = routing_distribution(torch.randn(3, 4), fn)
        assert torch.allclose(dist.sum(-1), torch.ones(3), atol=1e-6)
    all_mass = coupling_loss(s, s, 4)
    assert all_mass.item() == pytest.approx(-1.0, rel=1e-6)  # top-k = E: all the mass, -1·1
