"""Routing metrics against answers computed by hand on constructed routings and weights."""

import math

import pytest
import torch

from megatron_moe_reg import metrics
from megatron_moe_reg.losses.specialization import specialization_loss
from megatron_moe_reg.losses.weight_orthogonality import weight_orthogonality_from_gram, weight_orthogonality_loss


def test_routing_entropy_uniform_collapsed_and_two_point():
    E = 8
    assert float(metrics.routing_entropy(torch.full((5, E), 1 / E))) == pytest.approx(1.0)
    assert float(metrics.routing_entropy(torch.eye(E)[[3, 3, 3]])) == pytest.approx(0.0, abs=1e-12)
    two = torch.zeros(4, E)
    two[:, :2] = 0.5  # H = log 2, normalized log 2 / log 8 = 1/3
    assert float(metrics.routing_entropy(two)) == pytest.approx(1 / 3)
    mixed = torch.cat([torch.full((1, E), 1 / E), torch.eye(E)[:1]])  # (1 + 0) / 2
    assert float(metrics.routing_entropy(mixed)) == pytest.approx(0.5)
    assert float(metrics.routing_entropy(mixed, torch.tensor([True, False]))) == pytest.approx(1.0)


def test_router_distribution_of_every_score_function():
    logits = torch.tensor([[0.0, math.log(3.0)]])
    assert metrics.router_distribution(logits)[0].tolist() == pytest.approx([0.25, 0.75])
    s = torch.sigmoid(logits.double())
    assert metrics.router_distribution(logits, "sigmoid").tolist()[0] == pytest.approx((s / s.sum()).tolist()[0])
    s = torch.nn.functional.softplus(logits.double()).sqrt()  # Megatron 0.19's sqrtsoftplus scores
    found = metrics.router_distribution(logits, "sqrtsoftplus")
    assert found.dtype == torch.float64 and found[0].tolist() == pytest.approx((s / s.sum())[0].tolist())


def test_load_statistics_by_hand():
    counts = torch.tensor([6.0, 2.0, 0.0, 4.0])  # mean 3, population std sqrt(5)
    stats = metrics.load_statistics(counts)
    assert stats["load_min"] == 0 and stats["load_max"] == 6 and stats["dead_experts"] == 1
    assert stats["load_std"] == pytest.approx(math.sqrt(5))
    assert stats["load_cv"] == pytest.approx(math.sqrt(5) / 3)
    assert stats["load_max_violation"] == pytest.approx(1.0)
    p = torch.tensor([0.5, 1 / 6, 1 / 3], dtype=torch.float64)
    assert stats["load_entropy"] == pytest.approx(float(-(p * p.log()).sum()) / math.log(4))
    uniform = metrics.load_statistics(torch.full((4,), 7.0))
    assert uniform["load_cv"] == 0 and uniform["load_max_violation"] == 0
    assert uniform["load_entropy"] == pytest.approx(1)
    collapsed = metrics.load_statistics(torch.tensor([0.0, 0.0, 12.0, 0.0]))
    assert collapsed["dead_experts"] == 3 and collapsed["load_entropy"] == 0
    assert collapsed["load_max_violation"] == pytest.approx(3.0)  # 12 / 3 - 1


def test_percentiles_over_layers():
    assert metrics.percentiles([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx({"p50": 3.0, "p90": 4.6, "p95": 4.8})


def test_pathway_mutual_information_deterministic_and_independent():
    E = 8
    prev = torch.arange(E).repeat(50)  # uniform top-1 experts
    perm = torch.randperm(E, generator=torch.Generator().manual_seed(0))
    assert metrics.pathway_mutual_information(prev, perm[prev], E) == pytest.approx(math.log(E))
    assert metrics.pathway_conditional_entropy(prev, perm[prev], E) == pytest.approx(0.0, abs=1e-12)
    # independent: every (a, b) pair equally often -> MI exactly 0, H(B|A) = log E
    a = torch.arange(E).repeat_interleave(E)
    b = torch.arange(E).repeat(E)
    assert metrics.pathway_mutual_information(a, b, E) == pytest.approx(0.0, abs=1e-12)
    assert metrics.pathway_conditional_entropy(a, b, E) == pytest.approx(math.log(E))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, E, (200_000,), generator=g), torch.randint(0, E, (200_000,), generator=g)
    assert metrics.pathway_mutual_information(x, y, E) < 1e-3  # plug-in bias ~ (E-1)^2 / 2T


def test_top_pathway_share():
    paths = torch.tensor([[0, 0, 0, 1, 2], [1, 1, 1, 0, 3]])  # layers x tokens: (0,1) x3, (1,0), (2,3)
    assert metrics.top_pathway_share(paths, top=1) == pytest.approx(3 / 5)
    assert metrics.top_pathway_share(paths, top=2) == pytest.approx(4 / 5)
    assert metrics.top_pathway_share(paths, top=10) == pytest.approx(1.0)


def test_normalized_mutual_information():
    domains = torch.tensor([0, 0, 1, 1, 2, 2])
    assert metrics.normalized_mutual_information(torch.tensor([3, 3, 1, 1, 0, 0]), domains) == pytest.approx(1.0)
    assert metrics.normalized_mutual_information(torch.zeros(6, dtype=torch.long), domains) == 0.0
    independent = metrics.normalized_mutual_information(torch.tensor([0, 1, 0, 1, 0, 1]), domains)
    assert independent == pytest.approx(0.0, abs=1e-12)


def test_pes_and_activation_mso_by_hand():
    e0 = torch.tensor([[1.0, 0.0]])
    e1 = torch.tensor([[1.0, 1.0]])  # cos 1/sqrt2 with e0
    e2 = torch.tensor([[0.0, 1.0]])  # cos 0 with e0, 1/sqrt2 with e1
    outputs = torch.stack([e0, e1, e2])  # [N=3, T=1, H=2]
    assert float(metrics.pairwise_expert_similarity(outputs)) == pytest.approx((2 / math.sqrt(2)) / 3)
    assert float(metrics.activation_mso(outputs)) == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    same = torch.randn(1, 7, 5).expand(4, 7, 5)
    assert float(metrics.pairwise_expert_similarity(same)) == pytest.approx(1.0)
    assert float(metrics.activation_mso(-same[:2].clone() * torch.tensor([1.0, -1.0])[:, None, None])) \
        == pytest.approx(1.0)


def test_weight_mso_equals_orthogonality_loss_and_is_scale_free():
    w = torch.randn(6, 10, 3, generator=torch.Generator().manual_seed(2))
    scaled = w * torch.arange(1, 7).float()[:, None, None]
    expected = torch.stack([torch.nn.functional.cosine_similarity(w[i].flatten(), w[j].flatten(), dim=0) ** 2
                            for i in range(6) for j in range(6) if i != j]).mean()
    assert float(weight_orthogonality_loss(w)) == pytest.approx(float(expected), rel=1e-5)
    assert float(metrics.weight_mso(scaled)) == pytest.approx(float(expected), rel=1e-5)
    assert float(metrics.weight_mso(list(w))) == pytest.approx(float(expected), rel=1e-5)
    assert float(weight_orthogonality_loss(torch.eye(4))) == 0.0  # orthogonal experts
    assert float(weight_orthogonality_loss(torch.ones(3, 5))) == pytest.approx(1.0)  # identical experts


def test_weight_orthogonality_gradient_matches_autograd_reference():
    w = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(weight_orthogonality_loss, (w,))
    # from a Gram summed over two column shards == from the full weights
    shards = w.detach().chunk(2, dim=1)
    gram = sum(s @ s.t() for s in shards)
    assert float(weight_orthogonality_from_gram(gram)) == pytest.approx(float(weight_orthogonality_loss(w.detach())))


def test_coactivation_overlap_is_rsp_per_pair():
    z = torch.randn(9, 3, 16, generator=torch.Generator().manual_seed(3))
    assert float(metrics.coactivation_overlap(z)) == pytest.approx(float(specialization_loss(z)) / 6, rel=1e-5)
    assert float(metrics.coactivation_overlap(z[:, :1])) == 0.0


def test_router_geometry_of_orthonormal_rows():
    q, _ = torch.linalg.qr(torch.randn(16, 4, dtype=torch.float64))
    geometry = metrics.router_geometry(q.t() * 3.0)  # 4 orthogonal rows of norm 3
    assert geometry["router_sigma_max"] == pytest.approx(3.0)
    assert geometry["router_stable_rank"] == pytest.approx(4.0)
    assert geometry["router_row_orthogonality_error"] == pytest.approx(0.0, abs=1e-10)
    assert float(metrics.row_orthogonality_error(torch.ones(2, 3))) == pytest.approx(math.sqrt(2))
    assert geometry["router_condition_number"] == pytest.approx(1.0)
    assert geometry["router_svd_entropy"] == pytest.approx(1.0)
    assert geometry["router_row_cosine_mean"] == pytest.approx(0.0, abs=1e-10)


def test_router_conditioning_by_hand():
    # rows (1, 0, 0) and (1, 1, 0): σ² = (3 ± √5)/2, cosine 1/√2
    geometry = metrics.router_geometry(torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]))
    big, small = (3 + math.sqrt(5)) / 2, (3 - math.sqrt(5)) / 2
    p = [big / 3, small / 3]
    assert geometry["router_condition_number"] == pytest.approx(math.sqrt(big / small))
    assert geometry["router_svd_entropy"] == pytest.approx(-sum(q * math.log(q) for q in p) / math.log(2))
    assert geometry["router_row_cosine_mean"] == pytest.approx(1 / math.sqrt(2))
    # more experts than hidden units: the r = H non-zero singular values count, not the E - H zeros
    tall = metrics.router_geometry(torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]]))
    assert tall["router_condition_number"] == pytest.approx(2.0)
    assert tall["router_svd_entropy"] == pytest.approx(-(0.8 * math.log(0.8) + 0.2 * math.log(0.2)) / math.log(2))
    # a rank below min(E, H): κ is infinite, every σ² on one direction: entropy 0, identical rows: cosine 1
    collapsed = metrics.router_geometry(torch.ones(3, 4))
    assert (collapsed["router_condition_number"], collapsed["router_svd_entropy"],
            collapsed["router_row_cosine_mean"]) == (math.inf, 0.0, pytest.approx(1.0))
    # rank 4 < min(E, H) = 8 by construction (EMoE's E x H directions with --moe-eigen-rank 4): with the
    # structural rank, κ and the entropy are those of the four directions the router can have
    generator = torch.Generator().manual_seed(0)
    low_rank = torch.randn(8, 4, generator=generator) @ torch.randn(4, 16, generator=generator)
    geometry = metrics.router_geometry(low_rank, rank=4)
    singular = torch.linalg.svdvals(low_rank.double())[:4]
    share = singular**2 / (singular**2).sum()
    assert geometry["router_condition_number"] == pytest.approx(float(singular[0] / singular[3]), rel=1e-6)
    assert geometry["router_svd_entropy"] == pytest.approx(float(-(share * share.log()).sum() / math.log(4)), rel=1e-6)
    assert metrics.router_geometry(low_rank)["router_condition_number"] > 1e3  # rounding-level σ_8


def test_average_ranks_and_load_agreement_by_hand():
    assert metrics.average_ranks(torch.tensor([10.0, 30.0, 20.0, 20.0])).tolist() == [1.0, 4.0, 2.5, 2.5]
    counts = torch.tensor([5.0, 1.0, 3.0, 0.0])
    assert metrics.load_agreement(counts, counts) == (pytest.approx(1.0), pytest.approx(1.0))
    cosine, rho = metrics.load_agreement(counts, torch.tensor([0.0, 3.0, 1.0, 5.0]))  # ranks reversed
    assert rho == pytest.approx(-1.0) and cosine == pytest.approx(6 / 35)  # (5*0 + 1*3 + 3*1 + 0*5) / 35
    # ranks [4, 2, 3, 1] vs [1, 3, 2, 4] with one tie: Pearson of the ranks by hand
    cosine, rho = metrics.load_agreement(torch.tensor([4.0, 2.0, 3.0, 1.0]), torch.tensor([1.0, 2.0, 2.0, 4.0]))
    ra, rb = torch.tensor([4.0, 2, 3, 1]) - 2.5, torch.tensor([1.0, 2.5, 2.5, 4]) - 2.5
    assert rho == pytest.approx(float((ra * rb).sum() / (ra.norm() * rb.norm())))
    assert metrics.load_agreement(torch.ones(4), counts)[1] is None  # a constant load has no ranks
    assert metrics.load_agreement(torch.zeros(4), counts) == (None, None)


def test_topk_overlap_by_hand():
    actual = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)
    predicted = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 1], [0, 0, 1, 1]], dtype=torch.bool)
    assert metrics.topk_overlap(predicted, actual) == pytest.approx((1 + 0 + 0.5) / 3)
    assert metrics.topk_overlap(actual, actual) == 1.0
    assert metrics.topk_overlap(actual[:0], actual[:0]) == 0.0
