"""The studies' statistics against hand-computed values (and SciPy where it is installed)."""

import math

import pytest

from megatron_moe_reg.studies.stats import holm, in_words, paired, pearson, sign_flip_p, t_cdf, t_quantile

VARIANT = [1.0, 1.2, 0.9, 1.1, 1.3, 1.05]
BASELINE = [0.9, 1.0, 1.0, 0.95, 1.1, 1.0]


def test_student_t_matches_tables():
    assert t_cdf(2.0, 5) == pytest.approx(0.9490302605850709, abs=1e-12)
    assert t_cdf(-1.0, 1) == pytest.approx(0.25, abs=1e-12)  # Cauchy
    assert t_quantile(0.975, 4) == pytest.approx(2.7764451051977934, abs=1e-9)
    assert t_quantile(0.975, 1e6) == pytest.approx(1.959963984540054, abs=1e-5)


def test_paired_test_by_hand():
    r = paired(VARIANT, BASELINE)
    diffs = [0.1, 0.2, -0.1, 0.15, 0.2, 0.05]
    mean = sum(diffs) / 6
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 5)
    assert r.mean_diff == pytest.approx(mean) and r.sd_diff == pytest.approx(sd)
    assert r.t == pytest.approx(mean / (sd / math.sqrt(6)))
    assert r.ci_low == pytest.approx(mean - 2.5705818366147395 * sd / math.sqrt(6), abs=1e-9)
    # 2^6 sign patterns; |sum| >= 0.6 for the observed pattern and those flipping only -0.1 and/or 0.05
    assert r.p_sign_flip == pytest.approx(sign_flip_p(diffs))
    assert sign_flip_p([1.0, 1.0]) == pytest.approx(0.5)  # ++ and -- of four
    assert paired([1.0, 2.0, 3.0], [0.0, 1.0, 2.0]).p_t == 0.0  # a constant shift
    assert paired(VARIANT[:5], BASELINE[:5]).p_sign_flip is None  # below 6 seeds


def test_holm_and_pearson():
    assert holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})
    r, lo, hi = pearson([1, 2, 3, 4, 5, 6, 7], [2, 1, 4, 3, 6, 5, 8])
    z = math.atanh(r)
    assert (lo, hi) == pytest.approx((math.tanh(z - 1.96 / 2), math.tanh(z + 1.96 / 2)), abs=1e-4)


def test_words_say_not_significant():
    r = paired(VARIANT, BASELINE)
    assert "not significant at this scale" in in_words("val loss", r, 0.3)
    assert "higher (worse)" in in_words("val loss", r, 0.01, lower_is_better=True)


def test_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    r = paired(VARIANT, BASELINE)
    assert r.p_t == pytest.approx(stats.ttest_rel(VARIANT, BASELINE).pvalue, rel=1e-9)
    assert t_quantile(0.9, 7) == pytest.approx(stats.t.ppf(0.9, 7), rel=1e-9)
    x, y = [0.3, 1.2, 2.2, 2.9, 4.4, 5.1], [1.0, 0.7, 2.5, 2.0, 3.9, 3.1]
    assert pearson(x, y)[0] == pytest.approx(stats.pearsonr(x, y)[0], rel=1e-12)


def _report(diff, low, high, p_holm, base_mean=1.0, runs=None):
    comparison = {"mean_diff": diff, "ci_low": low, "ci_high": high, "p_holm": p_holm}
    return {"baseline": "base", "variants": {"base": {"m": {"mean": base_mean}}},
            "comparisons": {"v": {"m": comparison}}, "runs": runs or {}}


@pytest.mark.parametrize("expect, diff, low, high, p, word", [
    ("lower", -0.2, -0.3, -0.1, 0.01, "reproduced"),
    ("lower", 0.2, 0.1, 0.3, 0.01, "not reproduced"),
    ("higher", 0.2, 0.1, 0.3, 0.01, "reproduced"),
    ("lower", -0.2, -0.5, 0.1, 0.2, "not significant at this scale"),
    ("lower", -0.2, -0.3, -0.1, 0.06, "not significant at this scale"),  # Holm's p decides, not the raw one
    ("same", 0.01, -0.05, 0.07, 0.5, "reproduced"),  # inside ±0.1 of the baseline's mean 1.0
    ("same", 0.05, -0.05, 0.15, 0.5, "inconclusive"),
    ("same", 0.3, 0.2, 0.4, 0.01, "not reproduced"),
])
def test_claim_verdicts(expect, diff, low, high, p, word):
    from megatron_moe_reg.studies.claims import Claim, verdict

    got = verdict(Claim(expect=expect, metric="m", variant="v"), _report(diff, low, high, p))
    assert got["verdict"] == word, got


def test_uncorrelated_claim_needs_a_narrow_interval():
    from megatron_moe_reg.studies.claims import Claim, verdict

    claim = Claim(expect="uncorrelated", x="a", y="b")
    rng = __import__("random").Random(0)
    xs = [rng.gauss(0, 1) for _ in range(200)]
    independent = {"a": xs, "b": [rng.gauss(0, 1) for _ in range(200)]}
    assert verdict(claim, _report(0, 0, 0, 1, runs=independent))["verdict"] == "reproduced"
    few = {"a": xs[:6], "b": independent["b"][:6]}  # 6 runs: the interval is too wide to call
    assert verdict(claim, _report(0, 0, 0, 1, runs=few))["verdict"] == "inconclusive"
    tied = {"a": xs, "b": [x + 0.1 * rng.gauss(0, 1) for x in xs]}
    assert verdict(claim, _report(0, 0, 0, 1, runs=tied))["verdict"] == "not reproduced"
