"""The BASE model as its own judge: log-probabilities under the base weights.

No chat format and no instruct teacher: the judge is a plain document that a base model can
continue, a few reviewed examples followed by the open question, e.g.

    Instruction: Write the word "lamp" backwards.
    Response A: pmal
    Response B: lamp
    Which response follows the instruction better? Answer: A

and the verdict is read from log P(" A") vs log P(" B") (or " Yes" vs " No") at the next
token, via ``utils.scoring.next_token_logprobs``, or, for the default ``pmi`` pair judge,
from the log-likelihood of the response itself (``utils.scoring.completion_logprobs``) (full-vocabulary log-softmax, so the raw
numbers are true log-probabilities and are kept next to the normalised score).

* ``judge_instructions``: is an instruction clear, complete and answerable? score =
  P(Yes) / (P(Yes) + P(No)).
* ``score_responses``: POINTWISE response judge. Each (instruction, response) is judged alone
  ("Instruction: ...\nResponse: ...\nDoes the response follow the instruction exactly?
  Answer: Yes"); score s = P(Yes) normalised over Yes/No, i.e. sigmoid(logit) with
  logit = log P(Yes) - log P(No).
* ``compare_pairs``: which of two responses follows the instruction better. Three modes
  (``CriticConfig.pair_mode``):

  - ``pmi`` (default): each response scored alone by how much its instruction explains it,
    the mean log-likelihood gain per token
    (log P(response + end marker | instruction) - log P(response + end marker | empty
    instruction)) / n_tokens, both under the base weights in the project's one format after
    ``n_shots_pmi`` demonstrations. The soft preference for the first is the Bradley-Terry
    probability sigmoid(g1 - g2). A response the model would write whatever the instruction
    (fluent filler, an echo of the demonstrations) gains nothing; one whose format, answer and
    stopping point follow from the instruction gains. No question is asked, so there is no
    position or "Yes" bias to cancel. On gemma-3-270m (check set, TEST split, choices on DEV):
    0.667 [0.525, 0.783] (n=48), the only one of the three judges above chance.
  - ``pointwise``: both responses scored alone by P(Yes) to "does it pass?"; the soft
    preference is sigmoid(logit(s1) - logit(s2)). On gemma-3-270m it is worse than chance
    (0.375): P(Yes) rises with how long and sentence-like a response is, not with whether it
    obeys the instruction.
  - ``pairwise``: an A/B document asked in BOTH orders. A small base model prefers
    a position (often "A"); averaging P(first is better) over the two orders cancels a constant
    position bias exactly (a judge that always says "A" gives 0.5), and ``position_consistent`` says
    whether both orders picked the same response. On gemma-3-270m this judge is at chance (0.500):
    its position bias (about +-0.12 in P(A)) swamps a +-0.02 content signal. It is the judge to
    try first on a large base model (Qwen2.5-32B), where the question itself can be understood.

The judge always runs on the base weights: when a LoRA adapter is attached (the SFT policy
generating candidates), ``base_only`` disables it for the judging forward passes, so one model
stays resident and the policy never grades itself.

Prompt building and the preference maths are pure functions; only ``judge_instructions``,
``score_responses``/``pmi_scores`` and ``compare_pairs`` touch a model (handed in, never
loaded here).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the pure parts import without torch
    from utils.clean_model_loader import LoadedModel

# Bump whenever a header, a demonstration or a question below changes: it is recorded in every
# judged record, and ``judge_prompt_id`` hashes the exact text.
PROMPT_VERSION = "critic-v3"  # v2: pointwise response judge; v3: pmi response judge

ANSWER_A, ANSWER_B = " A", " B"
ANSWER_YES, ANSWER_NO = " Yes", " No"

PAIR_HEADER = (
    "Each instruction below was given to two assistants. A careful reviewer compared the two "
    "responses and wrote down which one follows the instruction better: correct, on topic, "
    "and in exactly the form the instruction asks for."
)
PAIR_QUESTION = "Which response follows the instruction better? Answer:"

INSTRUCTION_HEADER_TEXT = (
    "Requests sent to a helpful assistant, each checked by a reviewer. The reviewer answers "
    "Yes when the request is a clear, complete instruction or question that an assistant can "
    "answer, and No when it is cut off, garbled, not a request at all, or already an answer."
)
INSTRUCTION_QUESTION = "Is this a clear, complete instruction? Answer:"

# Demonstrations written for this project. Topics avoid the evaluation tasks
# (utils.eval_prompts.TASKS) and the critic check set (utils.critic_checkset). The better
# response alternates A, B, A, B ... so every even-length prefix is balanced.
PAIR_SHOTS: tuple[tuple[str, str, str, str], ...] = (
    ('Write the word "lamp" backwards.', "pmal", "lamp", "A"),
    (
        "Give two reasons to learn to swim. Use a numbered list.",
        "Swimming is fun.",
        "1. It keeps you safe near water.\n2. It is good exercise.",
        "B",
    ),
    (
        "Reply in lowercase only: what does a lighthouse do?",
        "a lighthouse shines a light to warn ships away from rocks.",
        "A Lighthouse Shines A Light To Warn Ships Away From Rocks.",
        "A",
    ),
    ("What is 9 minus 4?", "6", "5", "B"),
    (
        "Describe a kite in one sentence.",
        "A kite is a light frame covered in paper or cloth that flies on the wind at the end of "
        "a string.",
        "Kites. They fly. Some have tails. Children like them. They can break.",
        "A",
    ),
    ("Name a musical instrument that has strings.", "A drum.", "A violin.", "B"),
    (
        "Answer with yes or no: is a volcano hot inside?",
        "Yes.",
        "Volcanoes are openings in the crust of a planet, and many of them are found along the "
        "edges of tectonic plates.",
        "A",
    ),
    (
        "Explain in two sentences why owls hunt at night.",
        "Owl.",
        "Owls hunt at night because the small animals they eat are active then. Their large "
        "eyes and sharp hearing let them find prey in the dark.",
        "B",
    ),
)
INSTRUCTION_SHOTS: tuple[tuple[str, str], ...] = (
    ("Give two tips for keeping a teapot clean.", "Yes"),
    ("What is the best way to", "No"),
    ("Explain why bread goes stale.", "Yes"),
    ("blue quickly the of table run under", "No"),
    ("Write a haiku about a quiet harbor.", "Yes"),
    ("Sure! Here is a short story about a dragon who learns to fly.", "No"),
    ("How many minutes are in three hours?", "Yes"),
    ("1997", "No"),
)

PAIR_MODES = ("pmi", "pointwise", "pairwise")

# Pointwise response judge wordings: id -> (header or "", question). The id is recorded with
# every label; wording and shot count were chosen on the DEV split of the check set.
POINTWISE_PROMPTS: dict[str, tuple[str, str]] = {
    "exact-v1": (
        "Each instruction below was given to an assistant. A careful reviewer read the response "
        "and wrote Yes if it follows the instruction exactly (correct, on topic, and in exactly "
        "the form the instruction asks for) or No if it does not.",
        "Does the response follow the instruction exactly? Answer:",
    ),
    "grader-v1": (
        "Answer key of a strict grader. A response passes only if it is correct and obeys every "
        "rule in its instruction: length, format, letter case, and words to use or avoid.",
        "Does the response pass? Answer:",
    ),
}


def _response_shots() -> tuple[tuple[str, str, str], ...]:
    # Contrastive: each A/B demonstration gives its good response (Yes) and its bad one (No) for
    # the SAME instruction, so a demonstration pair differs only in whether it follows. Pair k
    # is shown Yes-then-No for even k, No-then-Yes for odd k: every prefix of 4 is balanced.
    shots: list[tuple[str, str, str]] = []
    for k, (ins, a, b, better) in enumerate(PAIR_SHOTS):
        good, bad = (a, b) if better == "A" else (b, a)
        pair = [(ins, good, "Yes"), (ins, bad, "No")]
        shots.extend(pair if k % 2 == 0 else pair[::-1])
    return tuple(shots)


RESPONSE_SHOTS: tuple[tuple[str, str, str], ...] = _response_shots()


@dataclass(frozen=True)
class CriticConfig:
    # Defaults chosen on the DEV split of utils.critic_checkset for gemma-3-270m
    # (scripts/evaluate_critic.py): 2 vs 4 A/B shots tied within noise, 2 is cheaper; 4 Yes/No
    # shots gave dev AUC 0.91 vs 0.63; Gemma says "Yes" to almost anything, so the dev-best
    # threshold sits well above 0.5.
    # Pair judge (runs/critic_eval*, gemma-3-270m, 24 dev / 48 test pairs): pairwise dev acc
    # 13/24 (2 shots), test 0.50 [0.36, 0.64], soft labels all within 0.48-0.52; pointwise
    # dev-best grader-v1 with 4 shots: dev 10/24, test 0.375 [0.25, 0.52], soft labels
    # max(p, 1-p) up to 0.76 but confidently wrong (dev 1/11 right at >= 0.55). Pointwise is
    # not better on dev. No threshold reaches 75% dev accuracy for either; 0.6 is above every
    # pairwise dev label (max 0.522), so a chance-level judge yields no pairs instead of
    # coin-flip labels. pmi (runs/critic_eval_pmi): dev 18/24 with 3 shots vs 16/24 with 0,
    # test 0.667 [0.525, 0.783]; at the kept threshold 0.6 dev 10/12 right (coverage 0.50),
    # test 0.682 [0.47, 0.84] (coverage 0.46). pmi is the default.
    pair_mode: str = "pmi"  # "pmi" (likelihood gain) | "pairwise" (A/B) | "pointwise" (Yes/No)
    n_shots_pmi: int = 3  # demonstrations before the instruction in the pmi judge (dev choice)
    pointwise_prompt: str = "grader-v1"  # key of POINTWISE_PROMPTS (dev choice)
    n_shots_pointwise: int = 4  # demonstrations in the pointwise prompt (dev: 4 beat 8)
    n_shots_pairs: int = 2  # demonstrations in the A/B prompt (at most len(PAIR_SHOTS))
    n_shots_instructions: int = 4  # demonstrations in the Yes/No prompt
    min_instruction_score: float = 0.62  # P(Yes) needed to call an instruction acceptable
    pair_confidence_threshold: float = 0.6  # P(chosen better) needed to keep a pair
    require_position_consistent: bool = False  # pairwise only: drop pairs whose orders disagree
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.pair_mode not in PAIR_MODES:
            raise ValueError(f"pair_mode must be one of {PAIR_MODES}, got {self.pair_mode!r}")
        if self.pointwise_prompt not in POINTWISE_PROMPTS:
            raise ValueError(
                f"pointwise_prompt must be one of {sorted(POINTWISE_PROMPTS)}, "
                f"got {self.pointwise_prompt!r}"
            )
        if not 0 <= self.n_shots_pointwise <= len(RESPONSE_SHOTS):
            raise ValueError(
                f"n_shots_pointwise must be in 0..{len(RESPONSE_SHOTS)}, "
                f"got {self.n_shots_pointwise}"
            )
        if not 0 <= self.n_shots_pmi <= len(PAIR_SHOTS):
            raise ValueError(f"n_shots_pmi must be in 0..{len(PAIR_SHOTS)}, got {self.n_shots_pmi}")
        if not 0 <= self.n_shots_pairs <= len(PAIR_SHOTS):
            raise ValueError(
                f"n_shots_pairs must be in 0..{len(PAIR_SHOTS)}, got {self.n_shots_pairs}"
            )
        if not 0 <= self.n_shots_instructions <= len(INSTRUCTION_SHOTS):
            raise ValueError(
                f"n_shots_instructions must be in 0..{len(INSTRUCTION_SHOTS)}, "
                f"got {self.n_shots_instructions}"
            )
        if not 0.0 <= self.min_instruction_score <= 1.0:
            raise ValueError(
                f"min_instruction_score must be in [0, 1], got {self.min_instruction_score}"
            )
        if not 0.5 <= self.pair_confidence_threshold <= 1.0:
            raise ValueError(
                "pair_confidence_threshold is P(chosen better) and must be in [0.5, 1], "
                f"got {self.pair_confidence_threshold}"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> CriticConfig:
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown critic keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Prompts (pure).


def _clean(text: str, what: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a string, got {type(text).__name__}")
    text = text.strip()
    if not text:
        raise ValueError(f"{what} is empty; the critic cannot judge an empty text")
    return text


def _pair_block(instruction: str, response_a: str, response_b: str) -> str:
    return f"Instruction: {instruction}\nResponse A: {response_a}\nResponse B: {response_b}\n"


def pair_prompt(instruction: str, response_a: str, response_b: str, n_shots: int) -> str:
    """The A/B judging document ending right before the answer token (" A" or " B")."""
    instruction = _clean(instruction, "instruction")
    response_a = _clean(response_a, "response A")
    response_b = _clean(response_b, "response B")
    blocks = [PAIR_HEADER]
    for ins, a, b, better in PAIR_SHOTS[:n_shots]:
        blocks.append(_pair_block(ins, a, b) + f"{PAIR_QUESTION} {better}")
    blocks.append(_pair_block(instruction, response_a, response_b) + PAIR_QUESTION)
    return "\n\n".join(blocks)


def instruction_prompt(instruction: str, n_shots: int) -> str:
    """The Yes/No judging document ending right before the answer token (" Yes" or " No")."""
    instruction = _clean(instruction, "instruction")
    blocks = [INSTRUCTION_HEADER_TEXT]
    for ins, verdict in INSTRUCTION_SHOTS[:n_shots]:
        blocks.append(f"Instruction: {ins}\n{INSTRUCTION_QUESTION} {verdict}")
    blocks.append(f"Instruction: {instruction}\n{INSTRUCTION_QUESTION}")
    return "\n\n".join(blocks)


def response_prompt(instruction: str, response: str, n_shots: int, prompt_id: str) -> str:
    """The pointwise judging document for ONE response, ending right before " Yes"/" No".

    Each block is the project's one format (``format_example``) followed by the question."""
    from utils.response_format import EXAMPLE_SEPARATOR, format_example

    if prompt_id not in POINTWISE_PROMPTS:
        raise ValueError(
            f"unknown pointwise prompt {prompt_id!r}; known: {sorted(POINTWISE_PROMPTS)}"
        )
    if not 0 <= n_shots <= len(RESPONSE_SHOTS):
        raise ValueError(f"n_shots must be in 0..{len(RESPONSE_SHOTS)}, got {n_shots}")
    instruction = _clean(instruction, "instruction")
    response = _clean(response, "response")
    header, question = POINTWISE_PROMPTS[prompt_id]
    blocks = [header] if header else []
    for ins, resp, verdict in RESPONSE_SHOTS[:n_shots]:
        blocks.append(f"{format_example(ins, resp)}\n{question} {verdict}")
    blocks.append(f"{format_example(instruction, response)}\n{question}")
    return EXAMPLE_SEPARATOR.join(blocks)


def _good_demonstrations(n_shots: int) -> list[tuple[str, str]]:
    return [(ins, a if better == "A" else b) for ins, a, b, better in PAIR_SHOTS[:n_shots]]


def pmi_prefix(instruction: str | None, n_shots: int) -> str:
    """The pmi judge's context: ``n_shots`` demonstrations (the good responses of
    ``PAIR_SHOTS``) in the project's one format, then the open prompt for ``instruction``;
    ``None`` gives the NULL context, the same document with an empty instruction line."""
    from utils.response_format import (
        EXAMPLE_SEPARATOR,
        INSTRUCTION_HEADER,
        RESPONSE_HEADER,
        format_example,
        format_prompt,
    )

    if not 0 <= n_shots <= len(PAIR_SHOTS):
        raise ValueError(f"n_shots must be in 0..{len(PAIR_SHOTS)}, got {n_shots}")
    blocks = [format_example(i, r) for i, r in _good_demonstrations(n_shots)]
    if instruction is None:
        blocks.append(f"{INSTRUCTION_HEADER}\n{RESPONSE_HEADER}")
    else:
        blocks.append(format_prompt(_clean(instruction, "instruction")))
    return EXAMPLE_SEPARATOR.join(blocks)


def pmi_completion(response: str) -> str:
    """The scored text: the response as the model would produce it, then the end-of-response
    marker, so stopping where the instruction says to stop is part of the score."""
    from utils.response_format import END_OF_RESPONSE_MARKER, format_completion

    return format_completion(_clean(response, "response")) + END_OF_RESPONSE_MARKER


def judge_prompt_id(cfg: CriticConfig) -> dict[str, str]:
    """Which judge made a label: version, pair mode, and the SHA-256 of the judging templates
    as configured. ``pair_prompt_sha256`` is the template the configured ``pair_mode`` uses;
    ``pair_judge_id`` is the short form recorded next to every soft label."""
    if cfg.pair_mode == "pmi":
        pair_t = "\n<null>\n".join(
            (pmi_prefix("{instruction}", cfg.n_shots_pmi), pmi_prefix(None, cfg.n_shots_pmi))
        ) + pmi_completion("{response}")
        answers, variant = "mean log-likelihood gain per token", f"shots{cfg.n_shots_pmi}"
    elif cfg.pair_mode == "pointwise":
        pair_t = response_prompt(
            "{instruction}", "{response}", cfg.n_shots_pointwise, cfg.pointwise_prompt
        )
        answers, variant = f"{ANSWER_YES!r}/{ANSWER_NO!r}", cfg.pointwise_prompt
    else:
        pair_t = pair_prompt("{instruction}", "{response_a}", "{response_b}", cfg.n_shots_pairs)
        answers, variant = f"{ANSWER_A!r}/{ANSWER_B!r}", "ab-both-orders"
    ins_t = instruction_prompt("{instruction}", cfg.n_shots_instructions)
    pair_sha = hashlib.sha256(pair_t.encode()).hexdigest()
    return {
        "prompt_version": PROMPT_VERSION,
        "pair_mode": cfg.pair_mode,
        "pair_judge_id": f"{PROMPT_VERSION}/{cfg.pair_mode}/{variant}/{pair_sha[:12]}",
        "pair_prompt_sha256": pair_sha,
        "instruction_prompt_sha256": hashlib.sha256(ins_t.encode()).hexdigest(),
        "pair_answers": answers,
        "instruction_answers": f"{ANSWER_YES!r}/{ANSWER_NO!r}",
    }


# --------------------------------------------------------------------------------------------
# Preference maths (pure).


def two_way_prob(logp_x: float, logp_y: float) -> float:
    """P(x) renormalised over the two answers: exp(lx) / (exp(lx) + exp(ly)) = sigmoid(lx - ly)."""
    for v, name in ((logp_x, "logp_x"), (logp_y, "logp_y")):
        if math.isnan(v) or v > 1e-6:
            raise ValueError(f"{name} must be a log-probability (<= 0, not NaN), got {v}")
    if logp_x == -math.inf and logp_y == -math.inf:
        return 0.5  # no mass on either answer: no information
    d = logp_x - logp_y
    # Numerically stable sigmoid for either sign of d.
    if d >= 0:
        return 1.0 / (1.0 + math.exp(-d))
    e = math.exp(d)
    return e / (1.0 + e)


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


def _sigmoid(d: float) -> float:
    if d >= 0:  # numerically stable for either sign; sigmoid(+-inf) = 1 / 0
        return 1.0 / (1.0 + math.exp(-d))
    e = math.exp(d)
    return e / (1.0 + e)


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
        "p_first": _sigmoid(margin),
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


def histogram(values: Sequence[float], lo: float = 0.5, hi: float = 1.0, bins: int = 10) -> dict:
    """Counts in ``bins`` equal bins over [lo, hi] (the last bin includes hi); soft labels of
    kept pairs live in [0.5, 1], so the default bins are 0.05 wide."""
    if bins < 1 or not hi > lo:
        raise ValueError(f"need bins >= 1 and hi > lo, got bins={bins}, [{lo}, {hi}]")
    counts = [0] * bins
    width = (hi - lo) / bins
    for v in values:
        if not lo <= v <= hi:
            raise ValueError(f"value {v} outside the histogram range [{lo}, {hi}]")
        counts[min(int((v - lo) / width), bins - 1)] += 1
    edges = [round(lo + k * width, 10) for k in range(bins + 1)]
    return {"edges": edges, "counts": counts}


def print_summary_table(title: str, rows: Sequence[tuple[str, Any]], hist: dict) -> None:
    """The pairs stages' end-of-run table: aligned rows, then the kept soft-label histogram
    (``histogram``'s dict) as "lower edge:count" pairs."""
    width = max(len(name) for name, _ in rows)
    print(f"\n{title}")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    pairs = zip(hist["edges"], hist["counts"], strict=False)  # one more edge than counts
    print("  kept soft labels: " + " ".join(f"{e:.2f}:{n}" for e, n in pairs))


# --------------------------------------------------------------------------------------------
# Model calls.


@contextlib.contextmanager
def base_only(lm: LoadedModel) -> Iterator[None]:
    """Run the block on the base weights: disables every attached LoRA adapter, if any."""
    model = lm.model
    if not getattr(model, "peft_config", None):
        if lm.adapters:
            raise RuntimeError(
                f"adapters {lm.adapters} are recorded as attached but the model has no PEFT "
                "config to disable; the critic must judge with the base weights"
            )
        yield
        return
    if hasattr(model, "disable_adapter"):  # peft.PeftModel: a context manager
        with model.disable_adapter():
            yield
        return
    # transformers' integrated PEFT (load_adapter on a plain model): explicit toggles.
    model.disable_adapters()
    try:
        yield
    finally:
        model.enable_adapters()


def _logprobs(lm: LoadedModel, prompts: Sequence[str], answers: Sequence[str], batch_size: int):
    from utils.generation import single_token_id
    from utils.scoring import next_token_logprobs

    ids = [single_token_id(lm, a) for a in answers]
    with base_only(lm):
        return next_token_logprobs(lm, prompts, ids, batch_size=batch_size).tolist()


def judge_instructions(
    lm: LoadedModel, instructions: Sequence[str], cfg: CriticConfig
) -> list[dict[str, Any]]:
    """One verdict per instruction: score = P(Yes) normalised over Yes/No, raw log-probs kept."""
    prompts = [instruction_prompt(i, cfg.n_shots_instructions) for i in instructions]
    if not prompts:
        return []
    rows = _logprobs(lm, prompts, (ANSWER_YES, ANSWER_NO), cfg.batch_size)
    out = []
    for ins, (lp_yes, lp_no) in zip(instructions, rows, strict=True):
        out.append(
            {
                "instruction": ins,
                **instruction_verdict(lp_yes, lp_no, cfg.min_instruction_score),
                "prompt_version": PROMPT_VERSION,
            }
        )
    return out


def pmi_scores(
    lm: LoadedModel, items: Sequence[tuple[str, str]], cfg: CriticConfig
) -> list[dict[str, Any]]:
    """``pmi_verdict`` for each (instruction, response): two scorings of the response through
    the base weights, after its instruction and after the empty one. Each distinct scoring is
    computed once (a response repeated under several instructions shares its null score)."""
    from utils.scoring import completion_logprobs

    keys: list[tuple[str | None, str]] = []
    index: dict[tuple[str | None, str], int] = {}

    def slot(key: tuple[str | None, str]) -> int:
        if key not in index:
            index[key] = len(keys)
            keys.append(key)
        return index[key]

    slots = []
    for k, item in enumerate(items):
        if len(item) != 2:
            raise ValueError(f"item {k}: expected (instruction, response), got {len(item)} items")
        ins, resp = _clean(item[0], "instruction"), _clean(item[1], "response")
        slots.append((slot((ins, resp)), slot((None, resp))))
    if not keys:
        return []
    with base_only(lm):
        scored = completion_logprobs(
            lm,
            [pmi_prefix(ins, cfg.n_shots_pmi) for ins, _ in keys],
            [pmi_completion(resp) for _, resp in keys],
            batch_size=cfg.batch_size,
        )
    out = []
    for c, n in slots:
        (lp_c, n_tok), (lp_n, _) = scored[c], scored[n]
        out.append({**pmi_verdict(lp_c, lp_n, n_tok), "prompt_version": PROMPT_VERSION})
    return out


def score_responses(
    lm: LoadedModel, items: Sequence[tuple[str, str]], cfg: CriticConfig
) -> list[dict[str, Any]]:
    """A verdict for each (instruction, response), judged alone. ``pair_mode`` "pmi":
    ``pmi_scores``. Otherwise the pointwise Yes/No verdict: ``response_verdict`` fields
    (score = P(Yes) over Yes/No, logit_nats, raw log-probs) plus the prompt id. Identical
    items are sent to the model once."""
    if cfg.pair_mode == "pmi":
        return pmi_scores(lm, items, cfg)
    prompts: list[str] = []
    index: dict[str, int] = {}
    slots = []
    for k, item in enumerate(items):
        if len(item) != 2:
            raise ValueError(f"item {k}: expected (instruction, response), got {len(item)} items")
        prompt = response_prompt(item[0], item[1], cfg.n_shots_pointwise, cfg.pointwise_prompt)
        if prompt not in index:
            index[prompt] = len(prompts)
            prompts.append(prompt)
        slots.append(index[prompt])
    if not prompts:
        return []
    rows = _logprobs(lm, prompts, (ANSWER_YES, ANSWER_NO), cfg.batch_size)
    return [
        {
            **response_verdict(*rows[s]),
            "pointwise_prompt": cfg.pointwise_prompt,
            "prompt_version": PROMPT_VERSION,
        }
        for s in slots
    ]


def compare_pairs(
    lm: LoadedModel,
    instruction_response_pairs: Sequence[tuple[str, str, str]],
    cfg: CriticConfig,
) -> list[dict[str, Any]]:
    """For each (instruction, first, second): soft preference ``p_first`` in [0, 1] for
    ``first``, by ``cfg.pair_mode``.

    pmi / pointwise: every distinct response scored once (``score_responses``), then
    ``strength_preference``; results hold both verdicts, ``margin_nats`` and
    ``position_consistent`` = None. pairwise: all 2N A/B prompts (both orders) in one batched
    call; results hold both orders' raw log-probs, ``position_consistent`` and ``margin_nats``.
    """
    for k, item in enumerate(instruction_response_pairs):
        if len(item) != 3:
            raise ValueError(
                f"pair {k}: expected (instruction, first, second), got {len(item)} items"
            )
    if not instruction_response_pairs:
        return []
    if cfg.pair_mode in ("pmi", "pointwise"):
        flat = [(ins, r) for ins, a, b in instruction_response_pairs for r in (a, b)]
        verdicts = score_responses(lm, flat, cfg)
        out = []
        for k in range(len(instruction_response_pairs)):
            res = strength_preference(verdicts[2 * k], verdicts[2 * k + 1], cfg.pair_mode)
            if cfg.pair_mode == "pointwise":
                res["pointwise_prompt"] = cfg.pointwise_prompt
            res["prompt_version"] = PROMPT_VERSION
            out.append(res)
        return out
    prompts = []
    for ins, first, second in instruction_response_pairs:
        prompts.append(pair_prompt(ins, first, second, cfg.n_shots_pairs))
        prompts.append(pair_prompt(ins, second, first, cfg.n_shots_pairs))
    rows = _logprobs(lm, prompts, (ANSWER_A, ANSWER_B), cfg.batch_size)
    out = []
    for k in range(len(instruction_response_pairs)):
        res = soft_preference(tuple(rows[2 * k]), tuple(rows[2 * k + 1]))
        res["pair_mode"] = "pairwise"
        res["prompt_version"] = PROMPT_VERSION
        out.append(res)
    return out
