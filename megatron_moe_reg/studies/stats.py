"""Paired statistics of a study, in pure Python (no SciPy needed; the tests compare with SciPy).

For a metric measured on n seeds for a variant (a_i) and the baseline (b_i), d_i = a_i - b_i:

- paired t-test: t = mean(d) / (sd(d) / √n), two-sided p from Student's t with n - 1 degrees of
  freedom; 95 % interval mean(d) ± t_{0.975, n-1} sd(d)/√n;
- exact sign-flip permutation test (n ≥ 6): p = share of the 2^n sign patterns s with
  |mean(s ⊙ d)| ≥ |mean(d)| (under H0 the signs of the paired differences are exchangeable);
- smallest detectable effect (two-sided α = 0.05, power 0.8): (t_{0.975, n-1} + t_{0.8, n-1}) sd(d)/√n;
- Holm's step-down correction across the metrics of a study;
- Pearson's r with a 95 % interval from Fisher's z (tanh(atanh r ± 1.96/√(n-3))).

Student's t distribution comes from the regularized incomplete beta function, evaluated by its
continued fraction (modified Lentz's method).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

ALPHA = 0.05
MIN_SIGN_FLIP = 6  # seeds from which the exact sign-flip test is reported


def _beta_fraction(a: float, b: float, x: float) -> float:
    tiny, term, c = 1e-300, 1.0, 1.0
    d = 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    value = d
    for m in range(1, 400):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            term = c * d
            value *= term
        if abs(term - 1.0) < 1e-15:
            break
    return value


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T ≤ t) = p (bisection)."""
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


def sign_flip_p(diffs: list[float]) -> float:
    """Exact two-sided sign-flip permutation p-value of mean(diffs) = 0."""
    observed = abs(sum(diffs))
    hits = total = 0
    for signs in itertools.product((1.0, -1.0), repeat=len(diffs)):
        total += 1
        hits += abs(sum(s * d for s, d in zip(signs, diffs, strict=True))) >= observed - 1e-12 * (1 + observed)
    return hits / total


@dataclass(frozen=True)
class PairedResult:
    n: int
    mean_diff: float
    sd_diff: float
    ci_low: float
    ci_high: float
    t: float
    p_t: float
    p_sign_flip: float | None
    detectable: float  # the smallest |mean difference| this design detects (α 0.05, power 0.8)

    def as_dict(self) -> dict:
        return asdict(self)


def paired(variant: list[float], baseline: list[float]) -> PairedResult:
    """The paired comparison of a variant's per-seed values with the baseline's (same seeds, same order)."""
    if len(variant) != len(baseline):
        raise ValueError(f"paired values need the same seeds: {len(variant)} vs {len(baseline)}")
    n = len(variant)
    if n < 2:
        raise ValueError("a paired test needs at least two seeds")
    diffs = [a - b for a, b in zip(variant, baseline, strict=True)]
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    se = sd / math.sqrt(n)
    df = n - 1
    crit = t_quantile(1 - ALPHA / 2, df)
    if se > 0:
        t = mean / se
        p = 2.0 * (1.0 - t_cdf(abs(t), df))
    else:
        t, p = (math.inf if mean else 0.0), (0.0 if mean else 1.0)
    return PairedResult(
        n=n,
        mean_diff=mean,
        sd_diff=sd,
        ci_low=mean - crit * se,
        ci_high=mean + crit * se,
        t=t,
        p_t=p,
        p_sign_flip=sign_flip_p(diffs) if n >= MIN_SIGN_FLIP else None,
        detectable=(crit + t_quantile(0.8, df)) * se,
    )


def holm(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm-adjusted p-values (step-down, monotone, capped at 1)."""
    order = sorted(pvalues, key=lambda key: pvalues[key])
    adjusted, running = {}, 0.0
    m = len(order)
    for rank, key in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[key]))
        adjusted[key] = running
    return adjusted


def pearson(x: list[float], y: list[float]) -> tuple[float, float, float]:
    """(r, 95 % interval low, high); the interval from Fisher's z (needs n > 3)."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    r = sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else 0.0
    if n <= 3:
        return r, -1.0, 1.0
    z, half = math.atanh(max(min(r, 1 - 1e-12), -1 + 1e-12)), 1.959963984540054 / math.sqrt(n - 3)
    return r, math.tanh(z - half), math.tanh(z + half)


def in_words(name: str, result: PairedResult, p_adjusted: float, lower_is_better: bool | None = None) -> str:
    """A sentence on one metric's paired difference."""
    if p_adjusted >= ALPHA:
        return (
            f"{name}: not significant at this scale (difference {result.mean_diff:+.4g}, 95 % CI "
            f"[{result.ci_low:+.4g}, {result.ci_high:+.4g}], Holm p = {p_adjusted:.3g}; "
            f"{result.n} seeds detect about ±{result.detectable:.3g})"
        )
    direction = "lower" if result.mean_diff < 0 else "higher"
    better = (
        "" if lower_is_better is None else (" (better)" if (result.mean_diff < 0) == lower_is_better else " (worse)")
    )
    return (
        f"{name}: {direction}{better} by {abs(result.mean_diff):.4g} (95 % CI [{result.ci_low:+.4g}, "
        f"{result.ci_high:+.4g}], Holm p = {p_adjusted:.3g}, {result.n} seeds)"
    )
