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

Prompts are built in ``utils.critic_prompts`` and the preference maths is in
``utils.preference_math`` (both pure); here only ``judge_instructions``,
``score_responses``/``pmi_scores`` and ``compare_pairs`` touch a model (handed in, never
loaded here).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from utils.critic_prompts import (
    ANSWER_A,
    ANSWER_B,
    ANSWER_NO,
    ANSWER_YES,
    INSTRUCTION_SHOTS,
    PAIR_MODES,
    PAIR_SHOTS,
    POINTWISE_PROMPTS,
    PROMPT_VERSION,
    RESPONSE_SHOTS,
    instruction_prompt,
    pair_prompt,
    pmi_completion,
    pmi_prefix,
    require_text,
    response_prompt,
)
from utils.preference_math import (
    instruction_verdict,
    pmi_verdict,
    response_verdict,
    soft_preference,
    strength_preference,
)

if TYPE_CHECKING:  # the pure parts import without torch
    from utils.clean_model_loader import LoadedModel


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
        ins, resp = require_text(item[0], "instruction"), require_text(item[1], "response")
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
