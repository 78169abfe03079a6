"""Tests for utils/stats.py: hand-computed values (arithmetic in comments) and statsmodels."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from utils.stats import (
    McNemarResult,
    benjamini_hochberg,
    cohens_h,
    compare_arms,
    holm_correction,
    mcnemar_exact,
    mcnemar_power,
    minimum_detectable_effect,
    paired_bootstrap_diff_ci,
    summarize_arm,
    wilson_interval,
)


def paired(n_both: int, n_a_only: int, n_b_only: int, n_neither: int) -> tuple[list, list]:
    """Success lists for A and B with the given 2x2 paired counts."""
    a = [True] * n_both + [True] * n_a_only + [False] * n_b_only + [False] * n_neither
    b = [True] * n_both + [False] * n_a_only + [True] * n_b_only + [False] * n_neither
    return a, b


# ---------------------------------------------------------------- Wilson interval


def test_wilson_hand_computed_8_of_10():
    # z = 1.959964, z^2 = 3.841459, p = 0.8, n = 10, 1 + z^2/n = 1.3841459
    # center = (0.8 + 3.841459/20) / 1.3841459 = 0.9920729 / 1.3841459 = 0.7167402
    # half   = 1.959964 * sqrt(0.8*0.2/10 + 3.841459/400) / 1.3841459
    #        = 1.959964 * sqrt(0.0256036) / 1.3841459 = 0.3136166 / 1.3841459 = 0.2265777
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.7167402 - 0.2265777, abs=2e-7)  # 0.4901625
    assert hi == pytest.approx(0.7167402 + 0.2265777, abs=2e-7)  # 0.9433179


def test_wilson_zero_successes_has_closed_form_upper_bound():
    # p = 0: center = half = (z^2 / 2n) / (1 + z^2/n), so lo = 0 and
    # hi = (z^2/n) / (1 + z^2/n) = 0.3841459 / 1.3841459 = 0.277533 for n = 10.
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0
    assert hi == pytest.approx(0.3841459 / 1.3841459, rel=1e-6)
    lo, hi = wilson_interval(10, 10)  # symmetric
    assert hi == pytest.approx(1.0, abs=1e-15)
    assert lo == pytest.approx(1.0 / 1.3841459, rel=1e-6)


def test_wilson_matches_statsmodels():
    proportion = pytest.importorskip("statsmodels.stats.proportion")
    for confidence in (0.8, 0.95, 0.99):
        for n in (1, 2, 7, 40):
            for k in range(n + 1):
                ours = wilson_interval(k, n, confidence)
                ref = proportion.proportion_confint(k, n, alpha=1 - confidence, method="wilson")
                assert ours == pytest.approx(ref, abs=1e-12), (k, n, confidence)


def test_wilson_rejects_bad_input():
    with pytest.raises(ValueError, match="n must be positive"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match=r"successes must be in \[0, n=5\]"):
        wilson_interval(6, 5)
    with pytest.raises(ValueError, match="successes must be an integer"):
        wilson_interval(2.0, 5)
    with pytest.raises(ValueError, match="confidence"):
        wilson_interval(2, 5, confidence=1.0)


def test_summarize_arm_hand_computed():
    out = summarize_arm([True] * 8 + [False] * 2)
    assert out["n"] == 10 and out["successes"] == 8 and out["accuracy"] == 0.8
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((0.4901625, 0.9433179), abs=2e-7)
    assert summarize_arm(np.array([1, 0, 1, 1]))["successes"] == 3  # 0/1 ints accepted


def test_summarize_arm_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        summarize_arm([])
    with pytest.raises(ValueError, match=r"successes\[2\] = .*2.* not a success boolean"):
        summarize_arm([1, 0, 2])
    with pytest.raises(ValueError, match="got a string"):
        summarize_arm("1101")
    with pytest.raises(ValueError, match="dtype float64"):
        summarize_arm([0.5, 1.0])
    with pytest.raises(ValueError, match="dtype object"):
        summarize_arm([True, None])


# ---------------------------------------------------------------- McNemar


def test_mcnemar_hand_computed_exact_and_mid_p():
    # 2 A-only, 8 B-only: m = 10, X ~ Bin(10, 1/2), k = min = 2.
    # P(X <= 2) = (1 + 10 + 45) / 1024 = 56/1024; exact p = 2 * 56/1024 = 112/1024 = 0.109375
    # point probability P(X = 2) = 45/1024; mid-p = 112/1024 - 45/1024 = 67/1024 = 0.0654296875
    a, b = paired(n_both=5, n_a_only=2, n_b_only=8, n_neither=4)
    res = mcnemar_exact(a, b)
    assert isinstance(res, McNemarResult)
    assert (res.n, res.n_both_success, res.n_both_fail) == (19, 5, 4)
    assert (res.n_a_only, res.n_b_only, res.n_discordant) == (2, 8, 10)
    assert res.p_value_exact == pytest.approx(112 / 1024, rel=1e-12)
    assert res.p_value_mid == pytest.approx(67 / 1024, rel=1e-12)
    assert res.p_value == res.p_value_exact and res.mid_p is False
    res_mid = mcnemar_exact(a, b, mid_p=True)
    assert res_mid.p_value == res_mid.p_value_mid and res_mid.mid_p is True


def test_mcnemar_one_sided_discordance_hand_computed():
    # 0 A-only, 5 B-only: exact p = 2 * P(X = 0) = 2/32 = 0.0625; mid-p = 2/32 - 1/32 = 1/32
    res = mcnemar_exact(*paired(0, 0, 5, 0))
    assert res.p_value_exact == pytest.approx(0.0625)
    assert res.p_value_mid == pytest.approx(1 / 32)
    # Symmetric: swapping arms swaps counts, not p-values.
    swapped = mcnemar_exact(*reversed(paired(0, 0, 5, 0)))
    assert (swapped.n_a_only, swapped.n_b_only) == (5, 0)
    assert swapped.p_value_exact == res.p_value_exact


def test_mcnemar_equal_discordant_counts_give_p_one():
    # 3 vs 3, m = 6: exact p = min(1, 2 * 42/64) = 1;
    # mid-p = 2 * P(X <= 3) - P(X = 3) = 84/64 - 20/64 = 64/64 = 1 (not 1 - 20/64)
    res = mcnemar_exact(*paired(4, 3, 3, 1))
    assert res.p_value_exact == 1.0
    assert res.p_value_mid == pytest.approx(1.0)


def test_mcnemar_no_discordant_pairs():
    res = mcnemar_exact([True, False, True], [True, False, True])
    assert (res.n_a_only, res.n_b_only) == (0, 0)
    assert res.p_value == 1.0 and res.p_value_mid == 1.0


def test_mcnemar_matches_statsmodels_exact():
    tables = pytest.importorskip("statsmodels.stats.contingency_tables")
    rng = np.random.default_rng(1)
    for _ in range(60):
        both, a_only, b_only, neither = (int(x) for x in rng.integers(0, 25, size=4))
        res = mcnemar_exact(*paired(both, a_only, b_only, neither))
        ref = tables.mcnemar([[both, a_only], [b_only, neither]], exact=True)
        assert res.p_value_exact == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-15)


def test_mcnemar_mid_p_is_exact_minus_point_probability():
    for a_only, b_only in [(1, 9), (4, 11), (0, 3), (17, 6)]:
        m, k = a_only + b_only, min(a_only, b_only)
        res = mcnemar_exact(*paired(0, a_only, b_only, 0))
        expected = res.p_value_exact - sps.binom.pmf(k, m, 0.5)
        assert res.p_value_mid == pytest.approx(expected, rel=1e-12)


def test_mcnemar_rejects_bad_input():
    with pytest.raises(ValueError, match="a_success has 3 entries, b_success has 2"):
        mcnemar_exact([True, False, True], [True, False])
    with pytest.raises(ValueError, match="empty"):
        mcnemar_exact([], [])
    with pytest.raises(ValueError, match=r"b_success\[1\]"):
        mcnemar_exact([1, 0], [1, 5])


# ---------------------------------------------------------------- paired bootstrap


def test_bootstrap_point_and_determinism():
    a, b = paired(n_both=50, n_a_only=20, n_b_only=60, n_neither=270)
    first = paired_bootstrap_diff_ci(a, b, n_resamples=4000, seed=3)
    again = paired_bootstrap_diff_ci(a, b, n_resamples=4000, seed=3)
    other = paired_bootstrap_diff_ci(a, b, n_resamples=4000, seed=4)
    assert first == again
    assert first != other
    # diff = (60 - 20) / 400 = 0.1
    assert first[0] == pytest.approx(0.1)
    assert first[1] < 0.1 < first[2]


def test_bootstrap_ci_matches_normal_theory_width():
    # Per-prompt d_i in {-1, 0, 1}: var(d) = psi - delta^2 = 80/400 - 0.1^2 = 0.19,
    # se = sqrt(0.19 / 400) = 0.0217945; 95% normal CI = 0.1 +- 1.959964 * 0.0217945
    # = (0.057284, 0.142716). The percentile bootstrap agrees to Monte Carlo/lattice error.
    a, b = paired(n_both=50, n_a_only=20, n_b_only=60, n_neither=270)
    _, lo, hi = paired_bootstrap_diff_ci(a, b, n_resamples=20000, seed=0)
    assert lo == pytest.approx(0.057284, abs=0.006)
    assert hi == pytest.approx(0.142716, abs=0.006)


def test_bootstrap_matches_literal_index_resampling():
    # The multinomial shortcut must give the same distribution as resampling prompt indices.
    rng = np.random.default_rng(11)
    a = rng.random(300) < 0.55
    b = np.where(rng.random(300) < 0.7, a, rng.random(300) < 0.7)
    _, lo, hi = paired_bootstrap_diff_ci(a, b, n_resamples=20000, seed=0)
    idx = np.random.default_rng(99).integers(0, 300, size=(20000, 300))
    diffs = b[idx].mean(axis=1) - a[idx].mean(axis=1)
    ref_lo, ref_hi = np.quantile(diffs, [0.025, 0.975])
    assert lo == pytest.approx(ref_lo, abs=0.007)
    assert hi == pytest.approx(ref_hi, abs=0.007)


def test_bootstrap_ci_covers_true_difference():
    # Population: p01 = 0.15 (B only), p10 = 0.05 (A only): true diff = 0.10.
    rng = np.random.default_rng(5)
    true_diff, covered, runs = 0.10, 0, 300
    for i in range(runs):
        cell = rng.choice(4, size=200, p=[0.4, 0.05, 0.15, 0.4])  # both, A only, B only, neither
        a = (cell == 0) | (cell == 1)
        b = (cell == 0) | (cell == 2)
        _, lo, hi = paired_bootstrap_diff_ci(a, b, n_resamples=1000, seed=i)
        covered += lo <= true_diff <= hi
    # Nominal 0.95; binomial sd over 300 runs is 0.013.
    assert 0.90 <= covered / runs <= 0.99


def test_bootstrap_edge_cases():
    assert paired_bootstrap_diff_ci([True, False] * 5, [True, False] * 5) == (0.0, 0.0, 0.0)
    assert paired_bootstrap_diff_ci([False] * 7, [True] * 7) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="a_success has 2 entries, b_success has 3"):
        paired_bootstrap_diff_ci([True, False], [True, False, True])
    with pytest.raises(ValueError, match="empty"):
        paired_bootstrap_diff_ci([], [])
    with pytest.raises(ValueError, match="n_resamples"):
        paired_bootstrap_diff_ci([True], [False], n_resamples=0)


# ---------------------------------------------------------------- Cohen's h


def test_cohens_h_hand_computed():
    # 2 asin(sqrt(0.75)) = 2 * pi/3, 2 asin(sqrt(0.5)) = 2 * pi/4: h = 2pi/3 - pi/2 = pi/6
    assert cohens_h(0.5, 0.75) == pytest.approx(math.pi / 6)
    assert cohens_h(0.75, 0.5) == pytest.approx(-math.pi / 6)  # sign: positive when p2 > p1
    assert cohens_h(0.0, 1.0) == pytest.approx(math.pi)  # 2 * pi/2 - 0
    assert cohens_h(0.3, 0.3) == 0.0
    with pytest.raises(ValueError, match="p2 must be a probability"):
        cohens_h(0.5, 1.2)


# ---------------------------------------------------------------- multiple testing


def test_holm_and_bh_hand_computed():
    p = [0.01, 0.04, 0.03, 0.005]
    # Holm, sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> running max
    # 0.02, 0.03, 0.06, 0.06; back in input order: [0.03, 0.06, 0.06, 0.02]
    assert holm_correction(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # BH, sorted: 0.005*4/1 = 0.02, 0.01*4/2 = 0.02, 0.03*4/3 = 0.04, 0.04*4/4 = 0.04 -> running
    # min from the top leaves them; input order: [0.02, 0.04, 0.04, 0.02]
    assert benjamini_hochberg(p) == pytest.approx([0.02, 0.04, 0.04, 0.02])


def test_holm_caps_at_one_and_bh_steps_up():
    # Holm: 0.4*3 = 1.2 -> 1; BH sorted [0.01, 0.5, 0.2]->[0.01, 0.2, 0.5]: 0.03, 0.3, 0.5
    assert holm_correction([0.4, 0.6, 0.5]) == [1.0, 1.0, 1.0]
    assert benjamini_hochberg([0.01, 0.5, 0.2]) == pytest.approx([0.03, 0.5, 0.3])
    # Step-up: sorted [0.02, 0.021]: 0.02*2/1 = 0.04 > 0.021*2/2 = 0.021 -> both 0.021
    assert benjamini_hochberg([0.02, 0.021]) == pytest.approx([0.021, 0.021])


def test_holm_and_bh_match_statsmodels():
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    rng = np.random.default_rng(2)
    cases = [[0.2], [0.05, 0.05, 0.05], [0.0, 1.0, 0.5, 0.5]]
    cases += [list(rng.random(m) ** 3) for m in (2, 5, 13, 40)]
    for p in cases:
        for ours, method in ((holm_correction, "holm"), (benjamini_hochberg, "fdr_bh")):
            ref = multitest.multipletests(p, method=method)[1]
            assert ours(p) == pytest.approx(list(ref), abs=1e-12), (method, p)


def test_multiple_testing_edge_cases():
    assert holm_correction([]) == [] and benjamini_hochberg([]) == []
    for fn in (holm_correction, benjamini_hochberg):
        with pytest.raises(ValueError, match=r"p_values\[1\] = nan"):
            fn([0.1, float("nan")])
        with pytest.raises(ValueError, match=r"p_values\[0\] = 1.5"):
            fn([1.5])


# ---------------------------------------------------------------- power and MDE


def test_mcnemar_power_normal_hand_computed():
    # n = 200, psi = 0.3, delta = 0.1, z = 1.959964:
    # (0.1 * sqrt(200) - 1.959964 * sqrt(0.3)) / sqrt(0.3 - 0.01)
    # = (1.4142136 - 1.0735165) / 0.5385165 = 0.632659 -> Phi(0.632659) = 0.736521
    assert mcnemar_power(200, 0.3, 0.1) == pytest.approx(0.736521, abs=1e-5)
    assert mcnemar_power(200, 0.3, -0.1) == mcnemar_power(200, 0.3, 0.1)  # two-sided


def test_mcnemar_power_connor_published_example():
    # powerandsamplesize.com (McNemar Z-test, 2-sided; Connor 1987 p. 209): p01 = 0.45,
    # p10 = 0.05, alpha = 0.05, power 0.8 -> n = ((1.96*sqrt(0.5) + 0.8416*sqrt(0.5 - 0.16))
    # / 0.4)^2 = 22.01, ceiling 23. So power(22) < 0.8 <= power(23).
    assert mcnemar_power(22, 0.5, 0.4) < 0.8 <= mcnemar_power(23, 0.5, 0.4)
    # And the MDE at psi = 0.5 crosses 0.4 between n = 22 and 23.
    assert minimum_detectable_effect(23, 0.5, p_discordant=0.5) < 0.4
    assert minimum_detectable_effect(22, 0.5, p_discordant=0.5) > 0.4


def test_exact_power_matches_brute_force_enumeration():
    # Enumerate every (B only, A only) count for n = 14 under the trinomial model and add the
    # probability of each outcome mcnemar_exact rejects at alpha = 0.05.
    n, p01, p10 = 14, 0.35, 0.05
    total = 0.0
    for i in range(n + 1):
        for j in range(n + 1 - i):
            if mcnemar_exact(*paired(0, j, i, n - i - j)).p_value <= 0.05:
                total += sps.multinomial.pmf([i, j, n - i - j], n, [p01, p10, 1 - p01 - p10])
    assert mcnemar_power(n, p01 + p10, p01 - p10, method="exact") == pytest.approx(total, 1e-9)


def test_exact_power_properties():
    # Size: under H0 the exact test rejects with probability <= alpha.
    assert mcnemar_power(60, 0.3, 0.0, method="exact") <= 0.05
    # Large n: exact and normal approximations agree.
    exact = mcnemar_power(2000, 0.2, 0.03, method="exact")
    normal = mcnemar_power(2000, 0.2, 0.03)
    assert exact == pytest.approx(normal, abs=0.02)
    assert mcnemar_power(50, 0.0, 0.0) == 0.0
    assert mcnemar_power(50, 0.0, 0.0, method="exact") == 0.0


def test_mcnemar_power_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\|effect\| must be <= p_discordant"):
        mcnemar_power(100, 0.1, 0.2)
    with pytest.raises(ValueError, match="method must be"):
        mcnemar_power(100, 0.3, 0.1, method="simulate")
    with pytest.raises(ValueError, match="n must be >= 1"):
        mcnemar_power(0, 0.3, 0.1)


def test_mde_fixed_discordance_inverts_connor():
    # n = 233: Connor's n for psi = 0.3, delta = 0.1 is
    # ((1.959964*sqrt(0.3) + 0.841621*sqrt(0.29)) / 0.1)^2 = (15.267419)^2 = 233.094, so the
    # MDE at n = 233 is a hair above 0.1, and plugging it back gives power 0.8.
    mde = minimum_detectable_effect(233, 0.5, p_discordant=0.3)
    assert mde == pytest.approx(0.1, abs=1e-4) and mde > 0.1
    assert mcnemar_power(233, 0.3, mde) == pytest.approx(0.8, abs=1e-9)


def test_mde_independence_model_round_trips():
    # Under independence psi = p_a (1 - p_b) + p_b (1 - p_a); the returned gain has power 0.8.
    for n, p_a in [(100, 0.5), (500, 0.3), (2000, 0.8)]:
        d = minimum_detectable_effect(n, p_a)
        p_b = p_a + d
        psi = p_a * (1 - p_b) + p_b * (1 - p_a)
        assert mcnemar_power(n, psi, d) == pytest.approx(0.8, abs=1e-8)
    # More prompts detect smaller gains; independence is more conservative than psi = 0.1.
    assert minimum_detectable_effect(400, 0.5) < minimum_detectable_effect(100, 0.5)
    assert minimum_detectable_effect(400, 0.5, p_discordant=0.1) < minimum_detectable_effect(
        400, 0.5
    )


def test_mde_unreachable_and_bad_input():
    assert minimum_detectable_effect(3, 0.5) == math.inf  # n <= z^2: nothing is detectable
    assert minimum_detectable_effect(3, 0.5, p_discordant=0.5) == math.inf
    assert minimum_detectable_effect(1000, 1.0) == math.inf  # A already perfect
    assert minimum_detectable_effect(100, 0.5, p_discordant=0.0) == math.inf
    with pytest.raises(ValueError, match="power must be in"):
        minimum_detectable_effect(100, 0.5, power=0.4)
    with pytest.raises(ValueError, match="impossible"):
        minimum_detectable_effect(100, 0.95, p_discordant=0.5)


# ---------------------------------------------------------------- compare_arms


def test_compare_arms_all_pairs_hand_checked():
    base, sft = paired(n_both=5, n_a_only=2, n_b_only=8, n_neither=4)
    dpo = [True] * 19
    rows = compare_arms({"base": base, "sft": sft, "dpo": dpo}, n_resamples=2000)
    assert [(r["arm_a"], r["arm_b"]) for r in rows] == [
        ("base", "sft"),
        ("base", "dpo"),
        ("sft", "dpo"),
    ]
    first = rows[0]
    # base 7/19, sft 13/19: diff = 6/19; exact p = 112/1024 (hand computed above)
    assert first["accuracy_a"] == pytest.approx(7 / 19)
    assert first["accuracy_b"] == pytest.approx(13 / 19)
    assert first["diff"] == pytest.approx(6 / 19)
    assert (first["n_a_only"], first["n_b_only"], first["n"]) == (2, 8, 19)
    assert first["p_value"] == pytest.approx(112 / 1024)
    assert first["p_value_mid"] == pytest.approx(67 / 1024)
    assert first["cohens_h"] == pytest.approx(cohens_h(7 / 19, 13 / 19))
    assert first["diff_ci_low"] < first["diff"] < first["diff_ci_high"]
    # base vs dpo: 0 A-only, 12 B-only -> p = 2/4096; sft vs dpo: 0 vs 6 -> p = 2/64
    assert rows[1]["p_value"] == pytest.approx(2 / 4096)
    assert rows[2]["p_value"] == pytest.approx(2 / 64)
    # Holm over (0.109375, 0.000488, 0.03125): sorted *3, *2, *1 = 0.001465, 0.0625, 0.109375
    assert [r["p_value_holm"] for r in rows] == pytest.approx([0.109375, 3 * 2 / 4096, 0.0625])
    # BH: sorted 0.000488*3/1 = 0.001465, 0.03125*3/2 = 0.046875, 0.109375*3/3 = 0.109375
    assert [r["p_value_bh"] for r in rows] == pytest.approx([0.109375, 3 * 2 / 4096, 0.046875])


def test_compare_arms_given_pairs_and_seed_independence_of_family():
    base, sft = paired(n_both=30, n_a_only=10, n_b_only=25, n_neither=35)
    results = {"base": base, "sft": sft, "dpo": sft[::-1]}
    alone = compare_arms(results, baseline_pairs=[("base", "sft")], n_resamples=2000)
    family = compare_arms(results, [("base", "sft"), ("base", "dpo")], n_resamples=2000)
    assert len(alone) == 1 and len(family) == 2
    # Same seed per pair: the CI of a pair does not depend on the rest of the family ...
    assert alone[0]["diff_ci_low"] == family[0]["diff_ci_low"]
    assert alone[0]["diff_ci_high"] == family[0]["diff_ci_high"]
    # ... but the corrections do: with one comparison they equal the raw p-value.
    assert alone[0]["p_value_holm"] == alone[0]["p_value"] == alone[0]["p_value_bh"]
    assert family[0]["p_value_holm"] >= family[0]["p_value"]
    assert compare_arms({"only": base}) == []


def test_compare_arms_rejects_bad_input():
    arms = {"base": [True, False, True], "sft": [True, True, True], "short": [True]}
    with pytest.raises(ValueError, match="unknown arm 'cai'"):
        compare_arms(arms, [("base", "cai")])
    with pytest.raises(ValueError, match="with itself"):
        compare_arms(arms, [("base", "base")])
    with pytest.raises(ValueError, match="listed twice"):
        compare_arms(arms, [("base", "sft"), ("base", "sft")])
    with pytest.raises(ValueError, match="comparing 'base' .* with 'short' .* 3 entries"):
        compare_arms(arms, [("base", "short")])
