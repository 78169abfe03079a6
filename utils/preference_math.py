"""Preference maths of the base-model critic (pure): from a judge's raw log-probabilities to
verdicts and soft preferences.

Two-way renormalisation over the answer tokens (``two_way_prob``), the both-orders A/B
preference that cancels a constant position bias (``soft_preference``), the pointwise and pmi
verdicts of one response (``response_verdict``, ``pmi_verdict``), and the Bradley-Terry
preference between two independently judged responses (``strength_preference``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def sigmoid(d: float) -> float:
    """1 / (1 + exp(-d)), without overflow for either sign of d."""
    if d >= 0:  # numerically stable for either sign; sigmoid(+-inf) = 1 / 0
        return 1.0 / (1.0 + math.exp(-d))
    e = math.exp(d)
    return e / (1.0 + e)


def two_way_prob(logp_x: float, logp_y: float) -> float:
    """P(x) renormalised over the two answers: exp(lx) / (exp(lx) + exp(ly)) = sigmoid(lx - ly)."""
    for v, name in ((logp_x, "logp_x"), (logp_y, "logp_y")):
        if math.isnan(v) or v > 1e-6:
            raise ValueError(f"{name} must be a log-probability (<= 0, not NaN), got {v}")
    if logp_x == -math.inf and logp_y == -math.inf:
        return 0.5  # no mass on either answer: no information
    return sigmoid(logp_x - logp_y)


def soft_preference(logp_ab: tuple[float, float], logp_ba: tuple[float, float]) -> dict[str, Any]:
    """Soft preference for the FIRST response from the raw (log P(" A"), log P(" B")) of both
    orders: ``logp_ab`` with the first response shown as A, ``logp_ba`` with it shown as B.

    p_first = mean(P(A | order AB), P(B | order BA)). A constant position preference adds the
    same amount to P(A) in both orders and so cancels: always-"A" gives exactly 0.5.
    """
    p_a_ab = two_way_prob(logp_ab[0], logp_ab[1])
    p_a_ba = two_way_prob(logp_ba[0], logp_ba[1])
    p_first_ab, p_first_ba = p_a_ab, 1.0 - p_a_ba
    p_first = 0.5 * (p_first_ab + p_first_ba)
    consistent = (p_first_ab > 0.5 and p_first_ba > 0.5) or (p_first_ab < 0.5 and p_first_ba < 0.5)
    return {
        "p_first": p_first,
        "p_first_order_ab": p_first_ab,
        "p_first_order_ba": p_first_ba,
        "position_consistent": consistent,
        # P(" A") averaged over the orders: 0.5 for an unbiased judge, 1.0 for always-"A".
        "p_a_mean": 0.5 * (p_a_ab + p_a_ba),
        # Log-odds of "first is better", averaged over the orders (nats).
        "margin_nats": 0.5 * ((logp_ab[0] - logp_ab[1]) + (logp_ba[1] - logp_ba[0])),
        "order_ab": {"logp_a": logp_ab[0], "logp_b": logp_ab[1]},
        "order_ba": {"logp_a": logp_ba[0], "logp_b": logp_ba[1]},
        "answer_mass_ab": math.exp(logp_ab[0]) + math.exp(logp_ab[1]),
        "answer_mass_ba": math.exp(logp_ba[0]) + math.exp(logp_ba[1]),
    }


def response_verdict(logp_yes: float, logp_no: float) -> dict[str, Any]:
    """One pointwise verdict: score = P(Yes) over Yes/No and its log-odds ``logit_nats``
    (= log P(Yes) - log P(No), so score = sigmoid(logit_nats)). No mass on either answer
    gives score 0.5, logit 0 (no information)."""
    score = two_way_prob(logp_yes, logp_no)  # validates both log-probabilities
    no_mass = logp_yes == -math.inf and logp_no == -math.inf
    logit = 0.0 if no_mass else logp_yes - logp_no  # +-inf when only one answer has no mass
    return {
        "score": score,
        "logit_nats": logit,
        "logp_yes": logp_yes,
        "logp_no": logp_no,
        "answer_mass": math.exp(logp_yes) + math.exp(logp_no),
    }


def pmi_verdict(logp_conditional: float, logp_null: float, n_tokens: int) -> dict[str, Any]:
    """One pmi verdict: the response's mean log-likelihood gain per token from seeing the
    instruction, (log P(r | instruction) - log P(r | empty instruction)) / n_tokens. Positive:
    the instruction explains the response (its format, its answer, where it stops); a response
    the model would write anyway scores about 0, however fluent or long it is, and the per-token
    mean keeps a longer response from winning by accumulating small gains."""
    for v, name in ((logp_conditional, "logp_conditional"), (logp_null, "logp_null")):
        if math.isnan(v) or v > 1e-6:
            raise ValueError(f"{name} must be a log-probability (<= 0, not NaN), got {v}")
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
    gain = (logp_conditional - logp_null) / n_tokens
    return {
        "score": gain,
        "logit_nats": gain,  # the strength compared in strength_preference
        "pmi_nats_per_token": gain,
        "logp_conditional": logp_conditional,
        "logp_null": logp_null,
        "n_tokens": n_tokens,
    }


def strength_preference(
    first: Mapping[str, Any], second: Mapping[str, Any], pair_mode: str
) -> dict[str, Any]:
    """Bradley-Terry preference for the FIRST of two independently judged responses, from
    their strengths ``logit_nats`` (pointwise: log-odds of Yes; pmi: gain per token):
    p_first = sigmoid(z1 - z2). 0.5 when equal, exactly 1 - p when swapped, a constant added to
    every strength cancels, and no order is ever shown (``position_consistent`` is None)."""
    z1, z2 = first["logit_nats"], second["logit_nats"]
    margin = 0.0 if z1 == z2 else z1 - z2  # equal infinities are a tie, not NaN
    return {
        "pair_mode": pair_mode,
        "p_first": sigmoid(margin),
        "margin_nats": margin,  # log-odds that the first is better; sigmoid(margin) = p_first
        "position_consistent": None,
        "first": dict(first),
        "second": dict(second),
    }


def pointwise_preference(
    logp_first: tuple[float, float], logp_second: tuple[float, float]
) -> dict[str, Any]:
    """Soft preference for the FIRST response from two independent pointwise verdicts, each
    given as (log P(" Yes"), log P(" No")).

    p_first = sigmoid(logit(s1) - logit(s2)): the Bradley-Terry probability with the judge's
    log-odds as strengths. In [0, 1]; 0.5 when the scores are equal; swapping the two gives
    exactly 1 - p_first; a bias that adds c to every logit (a judge that says "Yes" to
    anything) cancels. ``position_consistent`` is None: no order was ever shown."""
    return strength_preference(
        response_verdict(*logp_first), response_verdict(*logp_second), "pointwise"
    )


def instruction_verdict(logp_yes: float, logp_no: float, min_score: float) -> dict[str, Any]:
    score = two_way_prob(logp_yes, logp_no)
    return {
        "score": score,
        "accepted": score >= min_score,
        "logp_yes": logp_yes,
        "logp_no": logp_no,
        "answer_mass": math.exp(logp_yes) + math.exp(logp_no),
    }
