"""Paired statistics for comparing instruction-following arms evaluated on the SAME prompts.

Every arm (base few-shot, SFT, DPO, CAI, ...) is scored on one shared prompt set, giving one
success boolean per prompt. Because the prompts are shared, arms are compared PAIRED: the
evidence for "B beats A" is in the discordant prompts (A fails and B succeeds, or the reverse),
not in two independent accuracies. This module holds the pure functions for that:

    wilson_interval            CI for one arm's accuracy
    summarize_arm              n, successes, accuracy and its Wilson CI
    mcnemar_exact              exact (and mid-p) McNemar test on the discordant pairs
    paired_bootstrap_diff_ci   percentile CI of accuracy(B) - accuracy(A), resampling prompts
    cohens_h                   effect size for two proportions
    holm_correction            family-wise error control (step-down)
    benjamini_hochberg         false-discovery-rate control (step-up)
    mcnemar_power              power of McNemar's test for a paired design
    minimum_detectable_effect  smallest accuracy gain detectable with n prompts
    compare_arms               all of the above for a family of arm comparisons

Convention everywhere: for a pair (A, B), differences are B minus A, so a positive value means
B is better. ``n_a_only`` counts prompts where only A succeeds, ``n_b_only`` where only B does.
numpy and scipy only: no torch, no model, no I/O.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy import optimize
from scipy import stats as sps


def _check_confidence(confidence: float, name: str = "confidence") -> None:
    if not (isinstance(confidence, (int, float, np.floating)) and 0.0 < confidence < 1.0):
        raise ValueError(f"{name} must be a number strictly between 0 and 1, got {confidence!r}")


def _check_probability(value: float, name: str) -> None:
    if not (isinstance(value, (int, float, np.floating)) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")


def _check_count(value: Any, name: str) -> int:
    # bool is an int subclass; True as a count is almost certainly a caller bug.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    return int(value)


def _as_success_array(values: Sequence[bool], name: str) -> np.ndarray:
    """``values`` as a 1-D bool array; rejects strings, floats, None and anything not 0/1."""
    if isinstance(values, (str, bytes)):
        raise ValueError(f"{name} must be a sequence of booleans, got a string")
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr
    if arr.size == 0:
        return arr.astype(bool)
    if np.issubdtype(arr.dtype, np.integer):
        bad = np.flatnonzero((arr != 0) & (arr != 1))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"{name}[{i}] = {arr[i].item()!r} is not a success boolean (0/1)")
        return arr.astype(bool)
    raise ValueError(
        f"{name} must hold booleans (or 0/1 integers), got dtype {arr.dtype} "
        f"(first element {arr[:1].tolist()[0]!r})"
    )


def _as_paired_arrays(
    a_success: Sequence[bool], b_success: Sequence[bool]
) -> tuple[np.ndarray, np.ndarray]:
    a = _as_success_array(a_success, "a_success")
    b = _as_success_array(b_success, "b_success")
    if a.size != b.size:
        raise ValueError(
            f"paired arms must be scored on the same prompts: a_success has {a.size} "
            f"entries, b_success has {b.size}"
        )
    if a.size == 0:
        raise ValueError("a_success and b_success are empty: no prompts to compare")
    return a, b


def _two_sided_z(confidence: float) -> float:
    return float(sps.norm.ppf(0.5 + confidence / 2.0))


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927; Agresti & Coull 1998).

    With p = successes / n and z = Phi^-1(1 - alpha/2), alpha = 1 - confidence:

        center     = (p + z^2 / (2n)) / (1 + z^2 / n)
        half_width = z * sqrt(p (1 - p) / n + z^2 / (4 n^2)) / (1 + z^2 / n)
        interval   = (center - half_width, center + half_width)

    Unlike the Wald interval it stays inside [0, 1] and does not collapse to a point at
    p = 0 or p = 1. Matches statsmodels ``proportion_confint(method="wilson")``.

    n = 0 raises ValueError: an accuracy over zero prompts is undefined, and silently reporting
    (0, 1) would hide an empty evaluation.
    """
    successes = _check_count(successes, "successes")
    n = _check_count(n, "n")
    _check_confidence(confidence)
    if n <= 0:
        raise ValueError(f"n must be positive (no interval for zero trials), got n={n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n={n}], got {successes}")
    z = _two_sided_z(confidence)
    p = successes / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2.0 * n)) / denom
    half_width = z * math.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n)) / denom
    # Clip only float round-off (at p = 0 the lower bound is 0 up to ~1e-17).
    return max(0.0, center - half_width), min(1.0, center + half_width)


def summarize_arm(successes: Sequence[bool], confidence: float = 0.95) -> dict[str, Any]:
    """One arm's accuracy with its Wilson CI: {n, successes, accuracy, ci_low, ci_high}."""
    arr = _as_success_array(successes, "successes")
    if arr.size == 0:
        raise ValueError("successes is empty: no prompts were scored for this arm")
    k = int(arr.sum())
    lo, hi = wilson_interval(k, int(arr.size), confidence)
    return {
        "n": int(arr.size),
        "successes": k,
        "accuracy": k / arr.size,
        "ci_low": lo,
        "ci_high": hi,
    }


@dataclass(frozen=True)
class McNemarResult:
    """Outcome of McNemar's test for arms A and B on the same n prompts.

    ``p_value`` is the mid-p value when ``mid_p`` is True, else the exact one; both are always
    available as ``p_value_exact`` and ``p_value_mid``.
    """

    n: int  # prompts (pairs)
    n_both_success: int
    n_both_fail: int
    n_a_only: int  # A succeeds, B fails
    n_b_only: int  # A fails, B succeeds
    p_value: float
    mid_p: bool
    p_value_exact: float
    p_value_mid: float

    @property
    def n_discordant(self) -> int:
        return self.n_a_only + self.n_b_only


def _mcnemar_p_values(n_a_only: int, n_b_only: int) -> tuple[float, float]:
    """(exact two-sided p, mid-p) for the discordant counts; see ``mcnemar_exact``."""
    m = n_a_only + n_b_only
    if m == 0:
        return 1.0, 1.0
    p_exact = float(sps.binomtest(n_b_only, m, 0.5, alternative="two-sided").pvalue)
    k = min(n_a_only, n_b_only)
    # Fagerland et al. (2013): mid-p = 2 * (P(X <= k) - P(X = k) / 2). Equal to
    # p_exact - P(X = k) whenever p_exact is not capped at 1 (i.e. n_a_only != n_b_only);
    # for equal counts it is exactly 1, where "capped p minus point mass" would give < 1.
    p_mid = 2.0 * float(sps.binom.cdf(k, m, 0.5)) - float(sps.binom.pmf(k, m, 0.5))
    return min(1.0, p_exact), min(1.0, max(0.0, p_mid))


def mcnemar_exact(
    a_success: Sequence[bool], b_success: Sequence[bool], mid_p: bool = False
) -> McNemarResult:
    """Exact McNemar test (McNemar 1947) of "A and B have the same accuracy", paired by prompt.

    Only discordant prompts carry information. With b = n_b_only, c = n_a_only, m = b + c,
    under H0 b ~ Binomial(m, 1/2), and the exact two-sided p-value is
    ``scipy.stats.binomtest(b, m, 0.5).pvalue`` = min(1, 2 * P(X <= min(b, c))).

    The mid-p value (Lancaster 1961; recommended for McNemar by Fagerland, Lydersen & Laake
    2013, BMC Med Res Methodol 13:91) removes the conservatism of the discrete test:

        mid_p = 2 * P(X <= min(b, c)) - P(X = min(b, c))
              = exact p - point probability   (when b != c; it is 1 when b == c)

    No discordant prompts gives p = 1.0 (no evidence either way). Lengths must match.
    """
    a, b = _as_paired_arrays(a_success, b_success)
    n_a_only = int(np.sum(a & ~b))
    n_b_only = int(np.sum(~a & b))
    p_exact, p_mid = _mcnemar_p_values(n_a_only, n_b_only)
    return McNemarResult(
        n=int(a.size),
        n_both_success=int(np.sum(a & b)),
        n_both_fail=int(np.sum(~a & ~b)),
        n_a_only=n_a_only,
        n_b_only=n_b_only,
        p_value=p_mid if mid_p else p_exact,
        mid_p=bool(mid_p),
        p_value_exact=p_exact,
        p_value_mid=p_mid,
    )


def paired_bootstrap_diff_ci(
    a_success: Sequence[bool],
    b_success: Sequence[bool],
    n_resamples: int = 10000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(mean(b) - mean(a), lo, hi): percentile bootstrap CI (Efron & Tibshirani 1993, ch. 13).

    Prompts are resampled with replacement, keeping each prompt's (A, B) pair together. The
    statistic only depends on each prompt's d_i = b_i - a_i in {-1, 0, +1}, so a resample of n
    prompts is fully described by how many of each kind it drew, which is
    Multinomial(n, (n_a_only, n_tied, n_b_only) / n). Drawing those counts is the same
    distribution as drawing n prompt indices, in O(n_resamples) memory instead of
    O(n_resamples * n). Each resample's diff is (count_b_only - count_a_only) / n; the CI is
    the (alpha/2, 1 - alpha/2) quantiles of the n_resamples diffs. Deterministic given
    ``seed`` (numpy ``default_rng``).
    """
    a, b = _as_paired_arrays(a_success, b_success)
    n_resamples = _check_count(n_resamples, "n_resamples")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    _check_confidence(confidence)
    n = int(a.size)
    n_a_only = int(np.sum(a & ~b))
    n_b_only = int(np.sum(~a & b))
    point = (n_b_only - n_a_only) / n
    rng = np.random.default_rng(seed)
    probs = np.array([n_a_only, n - n_a_only - n_b_only, n_b_only], dtype=float) / n
    counts = rng.multinomial(n, probs, size=n_resamples)
    diffs = (counts[:, 2] - counts[:, 0]) / n
    alpha = 1.0 - confidence
    lo, hi = np.quantile(diffs, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(point), float(lo), float(hi)


def cohens_h(p1: float, p2: float) -> float:
    """Cohen's h effect size (Cohen 1988, sec. 6.2): 2 asin(sqrt(p2)) - 2 asin(sqrt(p1)).

    Sign convention: positive when p2 > p1, matching the B - A convention (p1 = accuracy of A,
    p2 = accuracy of B). Rough guide: |h| = 0.2 small, 0.5 medium, 0.8 large.
    """
    _check_probability(p1, "p1")
    _check_probability(p2, "p2")
    return 2.0 * math.asin(math.sqrt(p2)) - 2.0 * math.asin(math.sqrt(p1))


def _check_p_values(p_values: Sequence[float]) -> np.ndarray:
    p = np.asarray(p_values, dtype=float)
    if p.ndim != 1:
        raise ValueError(f"p_values must be one-dimensional, got shape {p.shape}")
    bad = np.flatnonzero(~((p >= 0.0) & (p <= 1.0)))  # also catches NaN
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"p_values[{i}] = {float(p[i])!r} is not a probability in [0, 1]")
    return p


def holm_correction(p_values: Sequence[float]) -> list[float]:
    """Holm (1979) step-down adjusted p-values, returned in the input order.

    Sort ascending p_(1) <= ... <= p_(m); adjusted p_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)).
    Controls the family-wise error rate under any dependence. Rejecting where adjusted <= alpha
    is the Holm procedure at level alpha. Matches statsmodels ``multipletests(method="holm")``.
    """
    p = _check_p_values(p_values)
    m = p.size
    if m == 0:
        return []
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted = np.empty(m)
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted.tolist()


def benjamini_hochberg(p_values: Sequence[float]) -> list[float]:
    """Benjamini-Hochberg (1995) step-up adjusted p-values ("q-values"), in the input order.

    Sort ascending; adjusted p_(i) = min_{j >= i} min(1, m p_(j) / j). Controls the false
    discovery rate under independence or positive dependence (PRDS). Matches statsmodels
    ``multipletests(method="fdr_bh")``.
    """
    p = _check_p_values(p_values)
    m = p.size
    if m == 0:
        return []
    order = np.argsort(p, kind="stable")
    scaled = p[order] * m / np.arange(1, m + 1)
    # Running minimum from the largest p downwards makes the adjusted values monotone.
    stepped = np.minimum.accumulate(scaled[::-1])[::-1]
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(1.0, stepped)
    return adjusted.tolist()


def _check_paired_design(p_discordant: float, effect: float) -> None:
    _check_probability(p_discordant, "p_discordant")
    if not isinstance(effect, (int, float, np.integer, np.floating)) or abs(effect) > p_discordant:
        raise ValueError(
            f"|effect| must be <= p_discordant (the accuracy difference is made of discordant "
            f"prompts), got effect={effect!r}, p_discordant={p_discordant!r}"
        )


def _normal_power_array(
    n: float, p_discordant: np.ndarray, effect: np.ndarray, alpha: float
) -> np.ndarray:
    """Connor (1987) normal-approximation power, elementwise; see ``mcnemar_power``."""
    psi = np.asarray(p_discordant, dtype=float)
    d = np.abs(np.asarray(effect, dtype=float))
    z = _two_sided_z(1.0 - alpha)
    numerator = d * math.sqrt(n) - z * np.sqrt(psi)
    variance = psi - d * d
    with np.errstate(divide="ignore", invalid="ignore"):
        power = sps.norm.cdf(numerator / np.sqrt(np.where(variance > 0.0, variance, 1.0)))
    # variance 0 with psi > 0: every prompt discordant in one direction, a deterministic outcome.
    power = np.where(variance > 0.0, power, np.where(numerator > 0.0, 1.0, 0.0))
    # No discordant prompts: the test can never reject.
    return np.where(psi > 0.0, power, 0.0)


def _exact_power(n: int, p_discordant: float, effect: float, alpha: float) -> float:
    """Exact power of the exact McNemar test, summing over the discordant count m."""
    if p_discordant == 0.0:
        return 0.0
    m = np.arange(n + 1)
    weight_m = sps.binom.pmf(m, n, p_discordant)
    # Given m discordant prompts, each is "B only" with probability q = p01 / p_discordant.
    q = (p_discordant + effect) / (2.0 * p_discordant)
    # Largest k with 2 * P(X <= k | m, 1/2) <= alpha (-1 if none): reject when
    # min(b, c) <= k_crit, i.e. b <= k_crit or b >= m - k_crit.
    k = sps.binom.ppf(alpha / 2.0, m, 0.5)
    # The relative slack mirrors binomtest's own tie tolerance, so boundary cases agree.
    k_crit = np.where(2.0 * sps.binom.cdf(k, m, 0.5) <= alpha * (1.0 + 1e-7), k, k - 1)
    power_m = np.where(
        k_crit >= 0,
        sps.binom.cdf(k_crit, m, q) + sps.binom.sf(m - k_crit - 1, m, q),
        0.0,
    )
    return float(np.clip(np.sum(weight_m * power_m), 0.0, 1.0))


def mcnemar_power(
    n: int,
    p_discordant: float,
    effect: float,
    alpha: float = 0.05,
    method: Literal["normal", "exact"] = "normal",
) -> float:
    """Power of the two-sided McNemar test with n paired prompts.

    Model: each prompt independently is "B only" with probability p01, "A only" with p10, and
    concordant otherwise; p_discordant = p01 + p10 and effect = p01 - p10 = acc(B) - acc(A).

    method="normal" (Connor 1987, Biometrics 43:207-211; the formula behind most McNemar
    sample-size tables):

        power = Phi( (|effect| sqrt(n) - z_{1-alpha/2} sqrt(p_discordant))
                     / sqrt(p_discordant - effect^2) )

    It ignores the far rejection tail (negligible except near effect = 0, where it gives
    alpha/2 instead of alpha) and inverts to Connor's sample size
    n = (z_{1-alpha/2} sqrt(psi) + z_{1-beta} sqrt(psi - effect^2))^2 / effect^2.

    method="exact": the exact unconditional power of ``mcnemar_exact`` (non-mid-p) under the
    same model, sum_m P(M = m) P(reject | m) with M ~ Binomial(n, p_discordant) and, given m,
    n_b_only ~ Binomial(m, p01 / p_discordant). It is a saw-tooth in n (discreteness) and
    usually a little below the normal value for small n.
    """
    n = _check_count(n, "n")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    _check_confidence(alpha, "alpha")
    _check_paired_design(p_discordant, effect)
    if method == "normal":
        return float(_normal_power_array(n, np.array(p_discordant), np.array(effect), alpha))
    if method == "exact":
        return _exact_power(n, p_discordant, effect, alpha)
    raise ValueError(f"method must be 'normal' or 'exact', got {method!r}")


def minimum_detectable_effect(
    n: int,
    p_a: float,
    alpha: float = 0.05,
    power: float = 0.8,
    p_discordant: float | None = None,
) -> float:
    """Smallest accuracy gain acc(B) - acc(A) > 0 that n paired prompts detect with ``power``.

    Uses the normal-approximation (Connor 1987) power of ``mcnemar_power``; two-sided test at
    ``alpha``; requires power > 0.5.

    - p_discordant given (a fixed fraction of discordant prompts, e.g. from a pilot run):
      closed form, solving Connor's equation for the effect d with psi = p_discordant:

          d = sqrt(psi) * (z_a sqrt(n) + z_b sqrt(n + z_b^2 - z_a^2)) / (n + z_b^2)

      with z_a = z_{1-alpha/2}, z_b = z_power.
    - p_discordant None: arms are assumed to fail independently given their accuracies, so
      psi(d) = p_a (1 - p_b) + p_b (1 - p_a) with p_b = p_a + d, and d is found numerically.
      Arms evaluated on the same prompts are usually positively correlated (fewer discordant
      prompts), so this is conservative: the true MDE is usually smaller.

    Returns math.inf when no gain up to the largest feasible one (p_b = 1, or the limit the
    given p_discordant allows) reaches the requested power.
    """
    n = _check_count(n, "n")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    _check_probability(p_a, "p_a")
    _check_confidence(alpha, "alpha")
    if not (isinstance(power, (int, float, np.floating)) and 0.5 < power < 1.0):
        raise ValueError(f"power must be in (0.5, 1), got {power!r}")
    z_a = _two_sided_z(1.0 - alpha)
    z_b = float(sps.norm.ppf(power))

    if p_discordant is not None:
        _check_probability(p_discordant, "p_discordant")
        # Feasible gains: p01 = (psi + d)/2 <= 1 - p_a and p10 = (psi - d)/2 <= p_a.
        d_max = min(p_discordant, 2.0 * (1.0 - p_a) - p_discordant)
        d_min = max(0.0, p_discordant - 2.0 * p_a)
        if d_max < d_min:
            raise ValueError(
                f"p_discordant={p_discordant} is impossible for an arm with accuracy "
                f"p_a={p_a}: no gain keeps every cell probability in [0, 1]"
            )
        # For n <= z_a^2 the equation has no root with d sqrt(n) > z_a sqrt(psi): no d works.
        if p_discordant == 0.0 or n <= z_a**2:
            return math.inf
        d = (
            math.sqrt(p_discordant)
            * (z_a * math.sqrt(n) + z_b * math.sqrt(n + z_b**2 - z_a**2))
            / (n + z_b**2)
        )
        if d > d_max:
            return math.inf
        # Gains below d_min cannot occur at this psi (A has too few successes to lose), so the
        # smallest gain there is, d_min, is then already detectable.
        return max(d, d_min)

    def psi(d: np.ndarray) -> np.ndarray:
        p_b = p_a + d
        return p_a * (1.0 - p_b) + p_b * (1.0 - p_a)

    def shortfall(d: float) -> float:
        return float(_normal_power_array(n, psi(np.array(d)), np.array(d), alpha)) - power

    d_max = 1.0 - p_a
    if d_max <= 0.0:
        return math.inf
    # Power need not be monotone in d over the whole range; bracket the FIRST crossing on a grid.
    grid = np.linspace(0.0, d_max, 2001)
    values = _normal_power_array(n, psi(grid), grid, alpha) - power
    if not np.any(values >= 0.0):
        return math.inf
    first = int(np.argmax(values >= 0.0))
    if first == 0:
        return 0.0
    return float(optimize.brentq(shortfall, grid[first - 1], grid[first], xtol=1e-12))


def compare_arms(
    results: Mapping[str, Sequence[bool]],
    baseline_pairs: list[tuple[str, str]] | None = None,
    n_resamples: int = 10000,
    confidence: float = 0.95,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Paired comparison of arms scored on the same prompts, one dict per (arm_a, arm_b).

    ``baseline_pairs`` lists the comparisons as (arm_a, arm_b); None means every pair of arms in
    ``results`` order (earlier arm as A). Each dict holds arm_a, arm_b, n, accuracy_a,
    accuracy_b, diff (= accuracy_b - accuracy_a), diff_ci_low, diff_ci_high (paired bootstrap),
    n_a_only, n_b_only, p_value (exact McNemar), p_value_mid, cohens_h (B vs A), and
    p_value_holm / p_value_bh: the exact p-values corrected across ALL comparisons returned
    (the family). Every pair's bootstrap uses the same ``seed``, so a pair's CI does not
    depend on which other pairs are in the family.
    """
    if baseline_pairs is None:
        pairs = list(itertools.combinations(results.keys(), 2))
    else:
        pairs = [tuple(pair) for pair in baseline_pairs]
    seen: set[tuple[str, str]] = set()
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"each comparison must be a pair (arm_a, arm_b), got {pair!r}")
        arm_a, arm_b = pair
        for arm in (arm_a, arm_b):
            if arm not in results:
                raise ValueError(f"unknown arm {arm!r}; arms are {sorted(results)}")
        if arm_a == arm_b:
            raise ValueError(f"cannot compare arm {arm_a!r} with itself")
        if pair in seen:
            raise ValueError(f"comparison {pair!r} is listed twice")
        seen.add(pair)

    rows: list[dict[str, Any]] = []
    for arm_a, arm_b in pairs:
        try:
            test = mcnemar_exact(results[arm_a], results[arm_b])
            diff, lo, hi = paired_bootstrap_diff_ci(
                results[arm_a], results[arm_b], n_resamples, confidence, seed
            )
        except ValueError as e:
            raise ValueError(f"comparing {arm_a!r} (A) with {arm_b!r} (B): {e}") from e
        acc_a = (test.n_both_success + test.n_a_only) / test.n
        acc_b = (test.n_both_success + test.n_b_only) / test.n
        rows.append(
            {
                "arm_a": arm_a,
                "arm_b": arm_b,
                "n": test.n,
                "accuracy_a": acc_a,
                "accuracy_b": acc_b,
                "diff": diff,
                "diff_ci_low": lo,
                "diff_ci_high": hi,
                "n_a_only": test.n_a_only,
                "n_b_only": test.n_b_only,
                "p_value": test.p_value_exact,
                "p_value_mid": test.p_value_mid,
                "cohens_h": cohens_h(acc_a, acc_b),
            }
        )
    p_family = [row["p_value"] for row in rows]
    for row, p_holm, p_bh in zip(
        rows, holm_correction(p_family), benjamini_hochberg(p_family), strict=True
    ):
        row["p_value_holm"] = p_holm
        row["p_value_bh"] = p_bh
    return rows
