"""Choosing ``cai.mode`` by measurement (issue 15): each mode's pair LABELLER, run on the
hand-written principle pairs of ``configs/constitution_eval/principles.jsonl`` (dev split).

A mode can only teach what its label gets right, so the two labels are compared on pairs whose
answer is known (an instruction, a response that follows the principle, one that breaks it):

* ``contrastive`` (``utils/constitution_contrastive.py``): the principle-conditioned likelihood
  gain, g(r) = [log P(r | S + sep + prompt) - log P(r | prompt)] / n(r) with S the principle's
  ``cai.contrastive_score_text``; the label prefers the response with the larger gain.
* ``revise`` (``utils/constitution.py``): the A/B judge document, both orders, averaged
  (``ab_soft_label``); the label prefers the "revision" side when P > 0.5.

A label is right on an item when it prefers ``follows`` (a tie is not right). The program
checkers the contrastive path adds for three principles are left out: they apply to the
policy's own answers and constraint records, not to these hand-written pairs. Both labels read
the BASE weights, as in the stages.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from utils.constitution_config import CAIConfig
from utils.constitution_contrastive import gain_rows, score_text
from utils.constitution_eval import PrincipleItem
from utils.constitution_pairs import ab_soft_label
from utils.constitution_prompts import Constitution, judge_prompts
from utils.critic import base_only
from utils.critic_prompts import ANSWER_A, ANSWER_B
from utils.stats import mcnemar_exact, summarize_arm

MODES = ("contrastive", "revise")


def contrastive_margins(
    lm: Any, items: Sequence[PrincipleItem], constitution: Constitution, cfg: CAIConfig
) -> list[float]:
    """g(follows) - g(breaks) per item (nats per token), base weights."""
    from utils.scoring import completion_logprobs

    prefixes, completions = gain_rows(
        [(score_text(constitution.principle(it.principle), cfg), it.instruction,
          (it.follows, it.breaks)) for it in items]
    )  # fmt: skip
    with base_only(lm):
        scored = completion_logprobs(lm, prefixes, completions, batch_size=cfg.judge_batch_size)
    gains = [(scored[2 * k][0] - scored[2 * k + 1][0]) / scored[2 * k][1] for k in
             range(len(scored) // 2)]  # fmt: skip
    return [gains[2 * j] - gains[2 * j + 1] for j in range(len(items))]


def revise_margins(
    lm: Any, items: Sequence[PrincipleItem], constitution: Constitution, cfg: CAIConfig
) -> list[float]:
    """P(prefer follows) - 0.5 per item from the A/B judge (follows in the revision's place)."""
    from utils.generation import single_token_id
    from utils.scoring import next_token_logprobs

    prompts = []
    for it in items:
        p = constitution.principle(it.principle)
        prompts += judge_prompts(
            constitution, p, it.instruction, it.breaks, it.follows, cfg.n_shots_judge
        )
    ids = [single_token_id(lm, ANSWER_A), single_token_id(lm, ANSWER_B)]
    with base_only(lm):
        rows = next_token_logprobs(lm, prompts, ids, batch_size=cfg.judge_batch_size).tolist()
    return [ab_soft_label(rows[2 * j], rows[2 * j + 1])["p_revision"] - 0.5
            for j in range(len(items))]  # fmt: skip


def compare_modes(margins: dict[str, Sequence[float]], confidence: float = 0.95) -> dict:
    """Accuracy (Wilson CI) of each mode's label, the paired McNemar test between them, and
    the choice: the higher accuracy; a tie goes to ``contrastive`` (no critique or revision
    to generate, so it is the cheaper stage)."""
    right = {m: [x > 0 for x in v] for m, v in margins.items()}
    arms = {m: summarize_arm(r, confidence) for m, r in right.items()}
    test = mcnemar_exact(right["contrastive"], right["revise"])
    acc = {m: a["accuracy"] for m, a in arms.items()}
    chosen = "revise" if acc["revise"] > acc["contrastive"] else "contrastive"
    return {"arms": arms, "mcnemar": dataclasses.asdict(test), "chosen": chosen}
