"""Likelihood scoring through vLLM's ``prompt_logprobs``, beside the HF path (utils/scoring.py).

With ``generation.scoring: vllm`` (default ``hf``) ``utils.vllm_engine.attach_backend`` puts a
``VllmScorer`` over the generation engine in the scorer slot, and
``utils.scoring.completion_logprobs`` / ``next_token_logprobs`` score through it, for the base
model only: while a LoRA adapter is attached to the HF model the HF path scores, as it
generates. Rows go in as token ids (``TokensPrompt``) built exactly as the HF path builds them
(the loader's encode path plus the completion tokenised on its own), never as chat messages;
the ids are checked by the policy right where they become vLLM prompts, and the ids vLLM
reports having consumed (``RequestOutput.prompt_token_ids``) must equal them.

vLLM returns log P(token j | tokens < j) for every prompt position (``prompt_logprobs=0``: the
prompt token's own log-probability, a full-vocabulary log-softmax of the raw logits), with
``max_tokens=1`` so almost nothing is generated. A next-token probability is the prompt
log-probability of the candidate appended as the last prompt token (one row per candidate).

How far the two paths agree is measured, not assumed: ``logprob_differences`` (pure) over both
paths' outputs, on the tiny model in tests/test_vllm_scoring.py and on the real model by
scripts/compare_scoring_backends.py (docs/scaling.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from utils.clean_model_loader import LoadedModel


def engine_prompts(
    lm: LoadedModel, rows: Sequence[Sequence[int]], allow_control_tokens: bool = False
) -> list[Any]:
    """The door to vLLM: each row's ids checked by the policy (no chat-control id; BOS as the
    policy says) and wrapped as vLLM's ``TokensPrompt`` (a TypedDict: this plain dict); nothing
    is re-tokenised."""
    if not allow_control_tokens:
        for i, ids in enumerate(rows):
            lm.check_ids(ids, where=f"vLLM prompt {i}")
    return [{"prompt_token_ids": list(ids)} for ids in rows]


def _one_token_pass(
    llm: Any, lm: LoadedModel, rows: Sequence[Sequence[int]], allow: bool, **params: Any
) -> list[Any]:
    """One vLLM pass over ``rows`` through the door, one greedy token generated per row."""
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, **params)
    return llm.generate(engine_prompts(lm, rows, allow), sp, use_tqdm=False)


def fed_prompt_ids(
    llm: Any, lm: LoadedModel, rows: Sequence[Sequence[int]], allow_control_tokens: bool = False
) -> list[list[int]]:
    """The ids vLLM reports having consumed for each row (``RequestOutput.prompt_token_ids``):
    what the sentinels check on the vLLM path, rather than the ids a caller meant to send."""
    outs = _one_token_pass(llm, lm, rows, allow_control_tokens)
    return [list(o.prompt_token_ids) for o in outs]


def prompt_token_logprobs(
    llm: Any,
    lm: LoadedModel,
    rows: Sequence[Sequence[int]],
    reads: Sequence[int],
    allow_control_tokens: bool = False,
) -> list[list[float]]:
    """log P(row[j] | row[:j]) for each row's last ``reads[i]`` tokens, in order."""
    for i, (r, k) in enumerate(zip(rows, reads, strict=True)):
        if not 1 <= k < len(r):
            raise ValueError(f"row {i}: cannot read {k} prompt log-probs of a {len(r)}-token row")
    outs = _one_token_pass(llm, lm, rows, allow_control_tokens, prompt_logprobs=0)
    result = []
    for i, (r, k, out) in enumerate(zip(rows, reads, outs, strict=True)):
        if list(out.prompt_token_ids) != list(r):
            raise RuntimeError(f"vLLM row {i}: the ids it scored are not the ids it was given")
        plp = out.prompt_logprobs  # position 0 is None: nothing predicts the first token
        result.append([float(plp[j][r[j]].logprob) for j in range(len(r) - k, len(r))])
    return result


class VllmScorer:
    """``utils.scoring.AttachedScorer`` on a vLLM ``LLM`` (the generation engine's)."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm

    def completion_logprobs(
        self, lm: LoadedModel, rows: Sequence[Sequence[int]], n_completion: Sequence[int]
    ) -> list[tuple[float, int]]:
        """(sum of the last ``n_completion[i]`` tokens' log-probs, that count) per row."""
        per_token = prompt_token_logprobs(self.llm, lm, rows, n_completion)
        return [(sum(v), len(v)) for v in per_token]

    def next_token_logprobs(
        self,
        lm: LoadedModel,
        encoded: Sequence[Sequence[int]],
        candidate_token_ids: Sequence[int],
        allow_control_tokens: bool = False,
    ) -> list[list[float]]:
        """log P(candidate | prompt) per prompt (rows) and candidate (columns)."""
        cand = list(candidate_token_ids)
        rows = [[*ids, c] for ids in encoded for c in cand]
        flat = prompt_token_logprobs(self.llm, lm, rows, [1] * len(rows), allow_control_tokens)
        return [[flat[i * len(cand) + j][0] for j in range(len(cand))] for i in range(len(encoded))]


def logprob_differences(
    reference: Sequence[tuple[float, int]], other: Sequence[tuple[float, int]]
) -> dict[str, Any]:
    """How far two scorings of the same texts ((summed log-prob, n tokens) each) differ: max
    and mean |difference| of the sums in nats, the largest per-token difference, and the row
    with the largest difference. Raises when a row's token counts differ (not the same rows)."""
    if len(reference) != len(other) or not reference:
        raise ValueError(f"need equally many (>0) rows, got {len(reference)} and {len(other)}")
    diffs = []
    for i, ((a, n), (b, m)) in enumerate(zip(reference, other, strict=True)):
        if n != m:
            raise ValueError(f"row {i}: {n} tokens scored by one path, {m} by the other")
        diffs.append(abs(a - b))
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    return {
        "n_texts": len(diffs),
        "n_tokens": sum(n for _, n in reference),
        "max_abs_diff_nats": max(diffs),
        "mean_abs_diff_nats": sum(diffs) / len(diffs),
        "max_abs_diff_per_token_nats": max(
            d / n for d, (_, n) in zip(diffs, reference, strict=True)
        ),
        "worst_row": worst,
    }
