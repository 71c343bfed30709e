"""Router functions and penalties against plain references and gradcheck (float64)."""

import math

import pytest
import torch

from megatron_moe_reg.losses import spectral_norm, spectral_penalty, stable_rank, stable_rank_penalty
from megatron_moe_reg.losses.router_penalties import power_iteration, sigma_from_vectors, top_singular_vectors
from megatron_moe_reg.routers import eigenbasis_scores, emoe_logits, orthonormal_basis, prototype_logits

D = torch.float64


def _matrix(rows=6, cols=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(rows, rows, generator=g, dtype=D))
    V, _ = torch.linalg.qr(torch.randn(cols, rows, generator=g, dtype=D))
    s = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.1], dtype=D)[:rows]
    return U @ torch.diag(s) @ V.t()  # well separated singular values


def test_power_iteration_converges_to_the_largest_singular_value():
    W = _matrix()
    sigma, u = spectral_norm(W, n_iter=100)
    assert sigma.item() == pytest.approx(torch.linalg.matrix_norm(W, ord=2).item(), rel=1e-10)
    sigma1, u1 = spectral_norm(W, u=u, n_iter=1)  # a persistent vector: one step keeps it
    assert sigma1.item() == pytest.approx(sigma.item(), rel=1e-10)
    with pytest.raises(ValueError, match="matrix"):
        spectral_norm(torch.randn(3))


def test_sigma_gradient_is_u_vT_and_matches_the_exact_norm():
    W = _matrix().requires_grad_()
    u, v = power_iteration(W, torch.ones(6, dtype=D), n_iter=200)
    sigma_from_vectors(W, u, v).backward()
    exact = _matrix().requires_grad_()
    torch.linalg.matrix_norm(exact, ord=2).backward()
    assert torch.allclose(W.grad, torch.outer(u, v))
    assert torch.allclose(W.grad, exact.grad, atol=1e-8)  # converged: d σ/dW = u vᵀ
    assert torch.autograd.gradcheck(lambda w: sigma_from_vectors(w, u, v), (W.detach().requires_grad_(),))


@pytest.mark.parametrize("shape", [(6, 9), (40, 9)])  # the rows' Gram, and the columns' for a tall matrix
def test_top_singular_vectors_in_one_call(shape):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(*shape, generator=g)
    u, v = top_singular_vectors(W, torch.randn(shape[0], generator=g))
    U, S, Vh = torch.linalg.svd(W.double())
    assert float(sigma_from_vectors(W, u, v)) == pytest.approx(float(S[0]), rel=1e-6)
    assert abs(float(u.double() @ U[:, 0])) == pytest.approx(1.0, abs=1e-6)
    assert abs(float(v.double() @ Vh[0])) == pytest.approx(1.0, abs=1e-6)


def _adam_on_the_penalty(vectors) -> float:
    """The stable rank of a near-isotropic 8 x 256 router (as initialized) after 48 AdamW steps on
    the stable-rank penalty alone, σ from ``vectors`` once per step."""
    g = torch.Generator().manual_seed(0)
    W = torch.nn.Parameter(torch.randn(8, 256, generator=g) * 0.02)
    opt = torch.optim.AdamW([W], lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    u = torch.randn(8, generator=g)
    for _ in range(48):
        u, v = vectors(W, u)
        opt.zero_grad()
        (1e-2 * stable_rank_penalty(W, sigma_from_vectors(W, u, v))).backward()
        opt.step()
    return float(stable_rank(W.detach()))


def test_the_stable_rank_penalty_raises_the_stable_rank_under_adam():
    start = float(stable_rank(torch.randn(8, 256, generator=torch.Generator().manual_seed(0)) * 0.02))
    assert _adam_on_the_penalty(top_singular_vectors) > start + 1.0  # 6.2 -> 7.5 (of at most 8)
    # one plain power step per optimizer step lags the top direction and lowers it instead (6.2 -> 2.6)
    assert _adam_on_the_penalty(power_iteration) < start - 2.0


def test_stable_rank_and_penalties():
    W = _matrix()
    s = torch.linalg.svdvals(W)
    assert stable_rank(W).item() == pytest.approx((s.pow(2).sum() / s[0] ** 2).item(), rel=1e-10)
    sigma = torch.tensor(5.0, dtype=D)
    assert stable_rank_penalty(W, sigma).item() == pytest.approx((25.0 / s.pow(2).sum()).item(), rel=1e-10)
    assert spectral_penalty(sigma).item() == 25.0
    assert spectral_penalty(sigma, target=4.0).item() == 1.0 and spectral_penalty(sigma, target=6.0).item() == 0.0
    Wg = W.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda w: stable_rank(w), (Wg,))


def test_orthonormal_basis_is_exact_deterministic_and_differentiable():
    A = torch.randn(3, 16, 4, dtype=D, requires_grad=True)
    U = orthonormal_basis(A)
    eye = torch.eye(4, dtype=D)
    assert torch.allclose(U.transpose(1, 2) @ U, eye.expand(3, 4, 4), atol=1e-12)
    R = U.transpose(1, 2) @ A  # diag(R) >= 0: the unique QR, so U depends smoothly on A
    assert (torch.diagonal(R, dim1=-2, dim2=-1) > 0).all()
    assert torch.allclose(orthonormal_basis(A * 2.0), U)  # scale-invariant
    assert torch.autograd.gradcheck(lambda a: orthonormal_basis(a).sum(dim=(0, 1)).square().sum(), (A,))
    U32 = orthonormal_basis(torch.randn(8, 512, 64))
    err = (U32.transpose(1, 2) @ U32 - torch.eye(64)).abs().max()
    assert err < 1e-5  # fp32 at a realistic size


def test_eigenbasis_scores_match_per_token_loop():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 12, generator=g, dtype=D)
    x[2] = 0.0
    bases = orthonormal_basis(torch.randn(5, 12, 3, generator=g, dtype=D))
    got = eigenbasis_scores(x, bases)
    for t in range(7):
        for e in range(5):
            nx = x[t].norm()
            want = 0.0 if nx == 0 else ((bases[e].t() @ x[t]).norm() / nx).item()
            assert got[t, e].item() == pytest.approx(want, abs=1e-12)
    assert (got >= 0).all() and (got <= 1).all() and not torch.isnan(got).any()
    full = orthonormal_basis(torch.randn(1, 12, 12, generator=g, dtype=D))
    assert torch.allclose(eigenbasis_scores(x[[0, 1]], full), torch.ones(2, 1, dtype=D))  # whole space: 1
    xr = x[[0, 1, 3]].clone().requires_grad_()
    A = torch.randn(5, 12, 3, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: eigenbasis_scores(a, orthonormal_basis(b)), (xr, A))


def test_prototype_logits_match_explicit_distances():
    x, mu = torch.randn(6, 10, dtype=D), torch.randn(4, 10, dtype=D)
    tau = torch.tensor(0.7, dtype=D)
    explicit = -((x[:, None, :] - mu[None, :, :]) ** 2).sum(-1) / tau  # the T x E x H form
    assert torch.allclose(prototype_logits(x, mu, tau), explicit, atol=1e-10)
    assert torch.autograd.gradcheck(lambda a, b, t: prototype_logits(a, b, t),
                                    (x.requires_grad_(), mu.requires_grad_(), tau.requires_grad_()))


def test_emoe_logits_match_the_authors_formula():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(5, 8, generator=g, dtype=D)
    Q = orthonormal_basis(torch.randn(8, 3, generator=g, dtype=D))
    M, gamma, b = torch.randn(4, 3, generator=g, dtype=D), torch.rand(3, generator=g, dtype=D), torch.randn(4, dtype=D)
    got = emoe_logits(h, Q, M, gamma, b, temperature=2.0)
    m = torch.softmax(M, dim=0)
    for t in range(5):
        z = Q.t() @ h[t]
        e = z ** 2 / ((z ** 2).sum() + 1e-6)
        for k in range(4):
            want = (sum(e[r] * gamma[r] * m[k, r] for r in range(3)) + b[k]) / 2.0
            assert got[t, k].item() == pytest.approx(want.item(), abs=1e-12)
    args = [a.clone().requires_grad_() for a in (h, Q, M, gamma, b)]
    assert torch.autograd.gradcheck(lambda *a: emoe_logits(*a, temperature=2.0), args)
    assert not torch.isnan(emoe_logits(torch.zeros(2, 8, dtype=D), Q, M, gamma, b)).any()
    assert math.isfinite(got.sum().item())
