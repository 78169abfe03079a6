"""Log-probabilities of given text under a model, computed once per shared prefix.

Every judge in this project scores many documents that begin the same way: the critic's
header and demonstrations, the pmi judge's demonstrations, the sentinels' probe. On a CPU the
prompt's forward pass is the whole cost (a 4-shot critic prompt is ~150 tokens in front of a
~20-token question), so the longest token prefix that ALL rows of a call share is run once,
its key/value cache is copied across each batch, and only the rows' own tails are computed.

Rows are right-padded, so every real token keeps the position it has in an unpadded forward,
and only the positions a caller needs go through the 262k-wide output head
(``logits_to_keep`` as an index tensor). The shared prefix is cut short where needed so that
every position a caller reads lies after it. ``min_shared_prefix=None`` disables the reuse;
the results are the same either way (tests compare them).

* ``next_token_logprobs``: log P(candidate token | prompt) for a few candidates (the judges'
  " Yes"/" No", " A"/" B").
* ``completion_logprobs``: sum of log P(completion tokens | prefix) and the token count.

With ``generation.scoring: vllm`` both run on the attached vLLM engine's ``prompt_logprobs``
instead (``attached_scorer``), from the same token ids (utils/vllm_scoring.py, where the
agreement between the two is measured).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from utils.clean_model_loader import LoadedModel

# Where a backend scorer (utils/vllm_scoring.py, attached by utils/vllm_engine.py) sits on a
# loaded model. It lives here, in the front door, so that scoring routes to it without
# importing it (the backend imports this module, not the other way round).
SCORER_KEY = "scoring_backend"


class AttachedScorer(Protocol):
    def completion_logprobs(
        self, lm: LoadedModel, rows: Sequence[Sequence[int]], n_completion: Sequence[int]
    ) -> list[tuple[float, int]]: ...

    def next_token_logprobs(
        self,
        lm: LoadedModel,
        encoded: Sequence[Sequence[int]],
        candidate_token_ids: Sequence[int],
        allow_control_tokens: bool = False,
    ) -> list[list[float]]: ...


def attached_scorer(lm: LoadedModel) -> AttachedScorer | None:
    """The backend scorer for ``lm`` (``generation.scoring: vllm``), or None (HF): None while a
    LoRA adapter is attached to the HF model (the backend scores the base weights)."""
    scorer = lm.derived_cache.get(SCORER_KEY)
    return scorer if scorer is not None and not lm.adapters else None


# Below this many shared tokens the copy of the cache costs about what it saves.
MIN_SHARED_PREFIX = 16


def _cache_kwarg(model: torch.nn.Module) -> str:
    """The forward keyword (and output field) of the KV cache: ``cache`` from transformers 5.2x
    on (where ``past_key_values`` is deprecated), ``past_key_values`` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def shared_prefix_length(rows: Sequence[Sequence[int]], reads: Sequence[int]) -> int:
    """Tokens that every row starts with, cut so that each row keeps its last ``reads[i]``
    positions (the ones whose outputs are read) out of the prefix; 0 for fewer than 2 rows."""
    if len(rows) < 2:
        return 0
    limit = min(len(r) - k for r, k in zip(rows, reads, strict=True))
    first = rows[0]
    for k in range(max(0, limit)):
        t = first[k]
        if any(r[k] != t for r in rows):
            return k
    return max(0, limit)


@torch.inference_mode()
def _read_tails(
    lm: LoadedModel,
    rows: Sequence[list[int]],
    reads: Sequence[int],
    batch_size: int,
    use: Callable[[int, torch.Tensor], None],
    min_shared_prefix: int | None = MIN_SHARED_PREFIX,
) -> None:
    """Forward every row and call ``use(i, logp)`` with the full-vocabulary log-softmax at
    row i's last ``reads[i]`` positions (shape [reads[i], vocab])."""
    for i, (r, k) in enumerate(zip(rows, reads, strict=True)):
        if not 1 <= k <= len(r):
            raise ValueError(f"row {i}: cannot read {k} positions of a {len(r)}-token row")
    shared = 0 if min_shared_prefix is None else shared_prefix_length(rows, reads)
    cache_kw = _cache_kwarg(lm.model)
    prefix_cache = None
    if shared and shared >= min_shared_prefix:
        ids = torch.tensor([rows[0][:shared]], dtype=torch.long, device=lm.device)
        out = lm.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        prefix_cache = getattr(out, cache_kw)
    else:
        shared = 0
    pad_id = lm.policy.pad_token_id
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        tails = [rows[i][shared:] for i in batch]
        width = max(len(t) for t in tails)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), shared + width), dtype=torch.long)
        mask[:, :shared] = 1
        needed: set[int] = set()
        for b, (i, t) in enumerate(zip(batch, tails, strict=True)):
            ids[b, : len(t)] = torch.tensor(t, dtype=torch.long)
            mask[b, shared : shared + len(t)] = 1
            needed.update(range(len(t) - reads[i], len(t)))
        keep = sorted(needed)
        where = {p: j for j, p in enumerate(keep)}
        kwargs = {}
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(len(batch))
            kwargs[cache_kw] = cache
        logits = lm.model(
            input_ids=ids.to(lm.device),
            attention_mask=mask.to(lm.device),
            logits_to_keep=torch.tensor(keep, dtype=torch.long, device=lm.device),
            use_cache=prefix_cache is not None,
            **kwargs,
        ).logits
        for b, (i, t) in enumerate(zip(batch, tails, strict=True)):
            cols = [where[p] for p in range(len(t) - reads[i], len(t))]
            use(i, torch.log_softmax(logits[b, cols].float(), dim=-1))


def next_token_logprobs(
    lm: LoadedModel,
    prompts: Sequence[str],
    candidate_token_ids: Sequence[int],
    batch_size: int = 16,
    allow_control_tokens: bool = False,
    min_shared_prefix: int | None = MIN_SHARED_PREFIX,
) -> torch.Tensor:
    """log P(candidate token | prompt) for every prompt and candidate: shape (n_prompts, n_cands).

    Used by the critic ("Answer: Yes/No", "A/B") and by sentinels. Full-vocabulary log-softmax,
    so the numbers are true log-probabilities, not renormalised over the candidates."""
    encoded = [lm.encode(p, allow_control_tokens=allow_control_tokens) for p in prompts]
    scorer = attached_scorer(lm)
    if scorer is not None:  # generation.scoring: vllm
        rows = scorer.next_token_logprobs(lm, encoded, candidate_token_ids, allow_control_tokens)
        return torch.tensor(rows, dtype=torch.float32).reshape(len(prompts), -1)
    cand = torch.tensor(list(candidate_token_ids), dtype=torch.long)
    out = torch.empty((len(prompts), len(cand)), dtype=torch.float32)

    def use(i: int, logp: torch.Tensor) -> None:
        out[i] = logp[-1].cpu()[cand]

    _read_tails(lm, encoded, [1] * len(encoded), batch_size, use, min_shared_prefix)
    return out


def completion_logprobs(
    lm: LoadedModel,
    prefixes: Sequence[str],
    completions: Sequence[str],
    batch_size: int = 8,
    min_shared_prefix: int | None = MIN_SHARED_PREFIX,
) -> list[tuple[float, int]]:
    """(sum of log P(completion tokens | prefix), number of completion tokens) per pair.

    The completion is tokenised on its own and appended to the encoded prefix (the way TRL
    builds prompt/completion examples), so the boundary is exact."""
    if len(prefixes) != len(completions):
        raise ValueError(f"{len(prefixes)} prefixes but {len(completions)} completions")
    rows, targets = [], []
    for k, (p, c) in enumerate(zip(prefixes, completions, strict=True)):
        c_ids = lm.tokenizer(c, add_special_tokens=False).input_ids
        if not c_ids:
            raise ValueError(f"completion {k} is empty after tokenisation: {c!r}")
        ids = lm.encode(p) + c_ids
        lm.check_ids(ids, where=f"completion_logprobs row {k}")
        rows.append(ids)
        targets.append(torch.tensor(c_ids, dtype=torch.long))
    scorer = attached_scorer(lm)
    if scorer is not None:  # generation.scoring: vllm
        return scorer.completion_logprobs(lm, rows, [len(t) for t in targets])
    out: list[tuple[float, int]] = [(0.0, 0)] * len(rows)

    def use(i: int, logp: torch.Tensor) -> None:
        # positions L-n-1 .. L-1 were read; the first n of them predict the n completion tokens
        t = targets[i].to(logp.device)
        out[i] = (float(logp[:-1].gather(-1, t[:, None]).sum()), len(t))

    _read_tails(lm, rows, [len(t) + 1 for t in targets], batch_size, use, min_shared_prefix)
    return out
