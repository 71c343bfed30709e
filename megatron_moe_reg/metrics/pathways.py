"""Cross-layer pathway coherence and expert-domain specialization (plug-in estimates, nats).

For the top-1 experts a_t (layer l) and b_t (layer l+1) of the same tokens, with the empirical
joint P(a, b) = n_ab / T:

    I(A; B)      = Σ_ab P(a,b) log( P(a,b) / (P(a) P(b)) )         mutual information
    H(B | A)     = H(A, B) - H(A)                                  conditional entropy
    top-n share  = share of tokens whose whole top-1 path (one expert per MoE layer) is one of the
                   n most frequent paths
    NMI(X; D)    = I(X; D) / sqrt(H(X) H(D))     expert choice X vs document domain D (geometric
                                                  normalization; 0 when either is constant)

A deterministic pathway (b = π(a), a uniform over E) gives I = log E and H(B|A) = 0; independent
layers give I ≈ 0 (the plug-in estimate is biased up by about (E-1)²/(2T)). Source labels:
arXiv 2602.14159 speaks of coherent cross-layer pathways (papers.md §1) without a metric; these
definitions are ours (inferred).
"""

from __future__ import annotations

import math
from collections import Counter

import torch


def joint_counts(a_T: torch.Tensor, b_T: torch.Tensor, num_a: int, num_b: int) -> torch.Tensor:
    """n[a, b]: how many tokens take a then b, [num_a, num_b] (int64)."""
    a, b = a_T.reshape(-1).long(), b_T.reshape(-1).long()
    if a.shape != b.shape:
        raise ValueError(f"the two label vectors differ in length: {a.numel()} vs {b.numel()}")
    return torch.bincount(a * num_b + b, minlength=num_a * num_b).reshape(num_a, num_b)


def _entropy_of_counts(counts: torch.Tensor) -> float:
    c = counts.double().reshape(-1)
    total = c.sum()
    if total <= 0:
        return 0.0
    p = c[c > 0] / total
    return float(-(p * p.log()).sum())


def mutual_information_from_counts(joint: torch.Tensor) -> float:
    """I(A; B) in nats from a joint count matrix."""
    return _entropy_of_counts(joint.sum(1)) + _entropy_of_counts(joint.sum(0)) - _entropy_of_counts(joint)


def pathway_mutual_information(experts_prev_T: torch.Tensor, experts_T: torch.Tensor, num_experts: int) -> float:
    """I(top-1 expert of layer l; top-1 expert of layer l+1) in nats."""
    return mutual_information_from_counts(joint_counts(experts_prev_T, experts_T, num_experts, num_experts))


def pathway_conditional_entropy(experts_prev_T: torch.Tensor, experts_T: torch.Tensor, num_experts: int) -> float:
    """H(expert of layer l+1 | expert of layer l) in nats."""
    joint = joint_counts(experts_prev_T, experts_T, num_experts, num_experts)
    return _entropy_of_counts(joint) - _entropy_of_counts(joint.sum(1))


def top_pathway_share(experts_LT: torch.Tensor, top: int = 10) -> float:
    """Share of tokens whose full top-1 path across the L MoE layers is among the ``top`` most frequent."""
    if experts_LT.numel() == 0:
        return 0.0
    paths = Counter(map(tuple, experts_LT.t().tolist()))
    return sum(n for _, n in paths.most_common(top)) / experts_LT.shape[1]


def normalized_mutual_information(labels_a_T: torch.Tensor, labels_b_T: torch.Tensor) -> float:
    """NMI = I(A; B) / sqrt(H(A) H(B)) in [0, 1] (0 when either labelling is constant)."""
    a, b = labels_a_T.reshape(-1).long(), labels_b_T.reshape(-1).long()
    joint = joint_counts(a, b, int(a.max()) + 1 if a.numel() else 1, int(b.max()) + 1 if b.numel() else 1)
    ha, hb = _entropy_of_counts(joint.sum(1)), _entropy_of_counts(joint.sum(0))
    if ha <= 0 or hb <= 0:
        return 0.0
    return mutual_information_from_counts(joint) / math.sqrt(ha * hb)
