"""Verdicts on a study's claims (the ``[[claims]]`` of its spec), from the report's statistics.

- ``expect = "lower" | "higher"`` (a variant against the baseline on one metric): *reproduced* when
  the Holm-corrected paired p < 0.05 and the difference has the expected sign; *not reproduced*
  when it is significant with the other sign; else *not significant at this scale*.
- ``expect = "same"`` with ``margin`` (relative to the baseline's mean, default 0.1): an
  equivalence check on the 95 % interval of the paired difference: *reproduced* when the interval
  lies within ±margin·|baseline mean|, *not reproduced* when it lies wholly outside, else
  *inconclusive*.
- ``expect = "uncorrelated"`` with ``x`` and ``y`` (two metrics, over every run of the study, all
  variants and seeds): Pearson's r with its 95 % interval (Fisher's z); *reproduced* only when the
  interval excludes |r| > ``max-r`` (default 0.5), *not reproduced* when it excludes |r| ≤ max-r,
  else *inconclusive*.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_moe_reg.studies.stats import ALPHA, pearson

EXPECT = ("lower", "higher", "same", "uncorrelated")


@dataclass(frozen=True)
class Claim:
    expect: str
    metric: str = ""  # lower / higher / same
    variant: str = ""  # lower / higher / same
    margin: float = 0.1  # same: relative to the baseline's mean
    x: str = ""  # uncorrelated
    y: str = ""
    max_r: float = 0.5
    source: str = ""  # who claims it (a paper, a figure)

    def metric_names(self) -> list[str]:
        """The metrics the claim reads."""
        return [self.x, self.y] if self.expect == "uncorrelated" else [self.metric]

    def title(self) -> str:
        if self.expect == "uncorrelated":
            return f"{self.x} and {self.y} uncorrelated across runs"
        if self.expect == "same":
            return f"{self.variant}: {self.metric} unchanged (within ±{self.margin:.0%})"
        return f"{self.variant}: {self.metric} {self.expect}"


def verdict(claim: Claim, report: dict) -> dict:
    """{claim, verdict, evidence} for one claim of a built report."""
    base = {"claim": claim.title(), "source": claim.source}
    missing = [m for m in claim.metric_names() if m in report.get("left_out", ())]
    if missing:
        return {**base, "verdict": "inconclusive", "evidence": f"{missing[0]} is undefined or infinite in some run"}
    if claim.expect == "uncorrelated":
        xs, ys = report["runs"][claim.x], report["runs"][claim.y]
        if len(xs) < 4:
            return {**base, "verdict": "inconclusive", "evidence": f"{len(xs)} runs; an interval needs 4 or more"}
        r, low, high = pearson(xs, ys)
        if -claim.max_r < low and high < claim.max_r:
            word = "reproduced"
        elif low > claim.max_r or high < -claim.max_r:
            word = "not reproduced"
        else:
            word = "inconclusive"
        return {**base, "verdict": word, "evidence": f"r = {r:+.3f}, 95 % CI [{low:+.3f}, {high:+.3f}], {len(xs)} runs"}
    comparison = report["comparisons"].get(claim.variant, {}).get(claim.metric)
    if comparison is None:
        return {**base, "verdict": "inconclusive", "evidence": "no paired comparison (too few finished seeds)"}
    diff, low, high, p = comparison["mean_diff"], comparison["ci_low"], comparison["ci_high"], comparison["p_holm"]
    evidence = f"difference {diff:+.4g}, 95 % CI [{low:+.4g}, {high:+.4g}], Holm p = {p:.3g}"
    if claim.expect == "same":
        bound = claim.margin * abs(report["variants"][report["baseline"]][claim.metric]["mean"])
        if -bound < low and high < bound:
            word = "reproduced"
        elif low > bound or high < -bound:
            word = "not reproduced"
        else:
            word = "inconclusive"
        return {**base, "verdict": word, "evidence": f"{evidence}; margin ±{bound:.4g}"}
    if p >= ALPHA:
        return {**base, "verdict": "not significant at this scale", "evidence": evidence}
    matches = (diff < 0) == (claim.expect == "lower")
    return {**base, "verdict": "reproduced" if matches else "not reproduced", "evidence": evidence}
