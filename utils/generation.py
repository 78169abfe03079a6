"""Batched generation for any model loaded by CleanModelLoader (scoring: utils/scoring.py).

- Prompts go through the loader's one encode path (BOS policy, chat-control refusal) and the
  ids actually fed to the model are checked again, row by row, after padding is stripped.
- Left padding, length-sorted batches, results returned in input order.
- Its own decode loop over the model's forward and KV cache (``DecodingConfig.loop``,
  default "shrinking"): a row that has stopped leaves the batch, so a batch costs what its
  rows generate rather than ``batch x longest row``; identical prompts in a batch (k samples of
  one prompt) are prefilled once. Same tokens as transformers' ``generate`` (tests), which
  stays selectable ("hf_generate") for comparison (scripts/benchmark_generation.py).
- Stops on whole stop STRINGS (transformers' StopStringCriteria, which matches strings across
  token boundaries) and on the model's EOS ids; never on the last token of a stop string.
- Every result records why it stopped ("eos", "stop_string", "max_new_tokens") and its token
  counts, counted by the tokenizer.
- Sampling is per sequence: each row draws its own Gumbel noise from a generator seeded by
  (seed, prompt), so a prompt and seed give the same completion whatever batch it shares and
  whatever ran before; nothing (cache, context, RNG state) carries from one call to the next.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList, StoppingCriteriaList
from transformers.generation.stopping_criteria import StopStringCriteria

from utils.clean_model_loader import LoadedModel

STOP_EOS, STOP_STRING, STOP_LIMIT = "eos", "stop_string", "max_new_tokens"
LOOP_SHRINKING, LOOP_HF = "shrinking", "hf_generate"
LOOPS = (LOOP_SHRINKING, LOOP_HF)


@dataclass(frozen=True)
class DecodingConfig:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 16
    stop_strings: tuple[str, ...] = ()
    # "shrinking" (default): finished rows leave the batch, so a batch costs what its rows
    # generate, not what its longest row generates; "hf_generate": transformers' generate, kept
    # for comparison (scripts/benchmark_generation.py). Same tokens either way (tests).
    loop: str = "shrinking"

    def __post_init__(self) -> None:
        if self.loop not in LOOPS:
            raise ValueError(f"loop must be one of {LOOPS}, got {self.loop!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DecodingConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown decoding keys {sorted(unknown)}; known: {sorted(known)}")
        d = dict(d)
        if "stop_strings" in d:
            d["stop_strings"] = tuple(d["stop_strings"])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "stop_strings": list(self.stop_strings)}


@dataclass
class Generation:
    prompt: str
    text: str  # completion cut before the first stop string / EOS
    raw_completion: str  # everything generated, stop string included, EOS excluded
    stop_reason: str  # "eos" | "stop_string" | "max_new_tokens"
    matched_stop: str | None
    n_prompt_tokens: int
    n_new_tokens: int  # tokens generated up to and including the stop (EOS counted)
    seed: int | None


def row_seed(seed: int, prompt: str) -> int:
    """A per-(seed, prompt) seed, independent of the prompt's position in a call."""
    h = hashlib.blake2b(f"{seed}\x00{prompt}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class PerRowGumbelSampler(LogitsProcessor):
    """Sampling as argmax over (filtered logits / T + Gumbel noise), the noise drawn from one
    generator per row (Gumbel-max trick): the same distribution as multinomial sampling from
    softmax(logits / T) restricted to the top-k/top-p set, but each row's randomness is its own.

    Returns a one-hot score row (0 for the sampled token, -inf elsewhere) so that greedy
    decoding picks the sample. For speed the nucleus is searched among the ``candidate_k``
    most likely tokens, falling back to a full sort when they hold less than ``top_p`` of the
    mass (an exact nucleus either way)."""

    candidate_k = 2048

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float, top_k: int):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k

    def _pick(self, row: torch.Tensor, gen: torch.Generator) -> int:
        vocab = row.shape[-1]
        k = min(vocab, self.top_k) if self.top_k else vocab
        if self.top_p < 1.0 and k > self.candidate_k:
            vals, idx = torch.topk(row, self.candidate_k)
            mass = torch.exp(vals - torch.logsumexp(row, -1)).sum()
            if mass < self.top_p:  # nucleus is wider than the candidates: exact full sort
                vals, idx = torch.sort(row, descending=True)
        elif k < vocab or self.top_p < 1.0:
            vals, idx = torch.topk(row, k)
        else:
            vals, idx = row, None
        if self.top_p < 1.0:
            probs = torch.softmax(row, -1)[idx] if idx is not None else torch.softmax(vals, -1)
            # Normalised over the full vocabulary; keep the token that crosses top_p.
            remove = (probs.cumsum(-1) - probs) > self.top_p
            vals = vals.masked_fill(remove, -math.inf)
        noise = torch.rand(vals.shape[-1], generator=gen).clamp_(1e-20, 1.0)
        choice = int(torch.argmax(vals - torch.log(-torch.log(noise))))
        return int(idx[choice]) if idx is not None else choice

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = torch.full_like(scores, -math.inf)
        out[torch.arange(len(self.generators)), self.pick(scores, range(len(self.generators)))] = (
            0.0
        )
        return out

    def pick(self, scores: torch.FloatTensor, rows: Sequence[int]) -> torch.LongTensor:
        """One sampled token per row of ``scores``; row j draws from generator ``rows[j]``."""
        scaled = scores.float().cpu() / self.temperature
        picked = [self._pick(scaled[j], self.generators[r]) for j, r in enumerate(rows)]
        return torch.tensor(picked, dtype=torch.long, device=scores.device)


def stop_string_criteria(lm: LoadedModel, stop_strings: Sequence[str]) -> StopStringCriteria:
    """transformers' whole-string matcher, built once per model and stop strings.

    Its own cache misses when the tokenizer returns its vocabulary in another order, which
    cost 5-10 s per call (Qwen) and more on Gemma's 262k vocabulary. The matcher is stateless
    between calls, so reusing it keeps calls independent."""
    key = ("stop_string_criteria", tuple(stop_strings))
    if key not in lm.derived_cache:
        lm.derived_cache[key] = StopStringCriteria(lm.tokenizer, list(stop_strings))
    return lm.derived_cache[key]


def _batches(order: list[int], batch_size: int) -> list[list[int]]:
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _pad_left(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask


def _first_stop(text: str, stop_strings: Sequence[str]) -> tuple[int, str | None]:
    best, which = len(text), None
    for s in stop_strings:
        i = text.find(s)
        if i != -1 and i < best:
            best, which = i, s
    return best, which


def _finish_row(
    lm: LoadedModel, new_ids: list[int], stop_strings: Sequence[str]
) -> tuple[str, str, str, str | None, int]:
    """(text, raw_completion, stop_reason, matched_stop, n_new_tokens) for one generated row."""
    tok = lm.tokenizer
    stop_ids = set(lm.policy.stop_token_ids)
    eos_at = next((i for i, t in enumerate(new_ids) if t in stop_ids), None)
    body = new_ids if eos_at is None else new_ids[:eos_at]
    decoded = tok.decode(body, skip_special_tokens=False)
    cut, which = _first_stop(decoded, stop_strings)
    if which is not None:
        # Fewest tokens whose decoding contains the stop string (later tokens are padding).
        lo, hi = 1, len(body)
        while lo < hi:
            mid = (lo + hi) // 2
            if _first_stop(tok.decode(body[:mid], skip_special_tokens=False), [which])[1] is None:
                lo = mid + 1
            else:
                hi = mid
        raw = tok.decode(body[:lo], skip_special_tokens=False)
        return raw[: _first_stop(raw, [which])[0]], raw, STOP_STRING, which, lo
    if eos_at is not None:
        return decoded, decoded, STOP_EOS, None, eos_at + 1
    return decoded, decoded, STOP_LIMIT, None, len(new_ids)


def finished_generation(
    lm: LoadedModel,
    prompt: str,
    prompt_ids: Sequence[int],
    new_ids: list[int],
    decoding: DecodingConfig,
    seed: int,
) -> Generation:
    """The ``Generation`` for one row's new token ids, cut by ``_finish_row`` (shared by the HF
    engine and the vLLM backend, so both report stops and counts by the same rule)."""
    text, raw, reason, which, n_new = _finish_row(lm, new_ids, decoding.stop_strings)
    return Generation(
        prompt=prompt,
        text=text,
        raw_completion=raw,
        stop_reason=reason,
        matched_stop=which,
        n_prompt_tokens=len(prompt_ids),
        n_new_tokens=n_new,
        seed=seed if decoding.do_sample else None,
    )


# Where a backend engine (utils/vllm_engine.py) is attached to a loaded model. It lives here, in
# the front door, so that generate() routes to a backend without importing it (vllm_engine
# imports this module, not the other way round).
ENGINE_KEY = "generation_backend"


def attached_engine(lm: LoadedModel) -> Any:
    """The backend engine for ``lm``'s next generate call (its ``generate(lm, prompts, encoded,
    decoding, seeds, progress)`` returns this module's Generations), or None (HF): None while a
    LoRA adapter is attached to the HF model (adapter serving is not wired to vLLM)."""
    engine = lm.derived_cache.get(ENGINE_KEY)
    return engine if engine is not None and not lm.adapters else None


def _cache_kwarg(model: torch.nn.Module) -> str:
    """The forward keyword for the KV cache: ``cache`` from transformers 5.2x on,
    ``past_key_values`` before (an unknown keyword is swallowed by ``**kwargs`` there, and the
    model would decode every step without its past: KNOWN_BUGS 36)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(inner.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _decode_shrinking(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, kwargs: dict[str, Any]
) -> list[list[int]]:
    """The new token ids of each row, decoded as ``model.generate(ids, mask, **kwargs)`` would
    (greedy argmax, or the PerRowGumbelSampler's pick; stop on an EOS id or a whole stop
    string, both checked by the same rules), except that a finished row leaves the batch: its
    KV cache rows are dropped and later steps run on the rows still going. Positions follow
    generate's left-padding rule (mask cumsum - 1)."""
    eos = set(kwargs["eos_token_id"])
    sampler = next(iter(kwargs.get("logits_processor") or []), None)
    stop = next(iter(kwargs.get("stopping_criteria") or []), None)
    cache = DynamicCache(config=model.config)
    kv = _cache_kwarg(model)
    position = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    active = list(range(ids.shape[0]))
    new: list[list[int]] = [[] for _ in active]
    seqs = ids
    # Identical prompts (k samples of one prompt) are prefilled once; their cache rows are
    # then copied out to every row that shares them.
    unique, inverse = torch.unique(ids, dim=0, return_inverse=True)
    first = [int((inverse == u).nonzero()[0]) for u in range(unique.shape[0])]
    out = model(input_ids=ids[first], attention_mask=mask[first], position_ids=position[first],
                **{kv: cache}, use_cache=True, logits_to_keep=1)  # fmt: skip
    logits = out.logits[:, -1, :][inverse]
    if first != active:  # rows shared, or torch.unique sorted them: back to the batch's order
        cache.batch_select_indices(inverse)
    last = position[:, -1:]
    for step in range(kwargs["max_new_tokens"]):
        if step:
            logits = out.logits[:, -1, :]
        tok = sampler.pick(logits, active) if sampler is not None else logits.argmax(-1)
        seqs = torch.cat([seqs, tok[:, None]], dim=-1)
        done = [t in eos for t in tok.tolist()]
        if stop is not None:
            done = [d or bool(s) for d, s in zip(done, stop(seqs, logits).tolist(), strict=True)]
        for j, row in enumerate(active):
            new[row].append(int(tok[j]))
        keep = [j for j, d in enumerate(done) if not d]
        if not keep or step == kwargs["max_new_tokens"] - 1:
            break
        if len(keep) < len(active):
            idx = torch.tensor(keep, device=ids.device)
            cache.batch_select_indices(idx)
            seqs, mask, last, tok = seqs[idx], mask[idx], last[idx], tok[idx]
            active = [active[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        last = last + 1
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=last, **{kv: cache},
                    use_cache=True, logits_to_keep=1)  # fmt: skip
    return new


@torch.inference_mode()
def generate(
    lm: LoadedModel,
    prompts: Sequence[str],
    decoding: DecodingConfig,
    seed: int | Sequence[int] = 0,
    allow_control_tokens: bool = False,
    progress: bool = True,
    desc: str = "generate",
) -> list[Generation]:
    """Generate one completion per prompt; results in input order."""
    if not prompts:
        return []
    seeds = [seed] * len(prompts) if isinstance(seed, int) else list(seed)
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    encoded = [lm.encode(p, allow_control_tokens=allow_control_tokens) for p in prompts]
    if not allow_control_tokens:
        for i, r in enumerate(encoded):
            lm.check_ids(r, where=f"prompt {i}")  # the ids fed to either engine
    engine = attached_engine(lm)
    if engine is not None:  # generation.backend resolved to vLLM (utils/vllm_engine.py)
        return engine.generate(lm, prompts, encoded, decoding, seeds, progress)
    # Length-sorted batches waste little compute on padding; identical prompts side by side
    # (prefilled once); a total order, so the grouping is reproducible.
    order = sorted(range(len(prompts)), key=lambda i: (len(encoded[i]), encoded[i], i))
    results: list[Generation | None] = [None] * len(prompts)
    model, pad_id = lm.model, lm.policy.pad_token_id
    device = lm.device
    n_tokens, t0 = 0, time.perf_counter()
    bar = tqdm(total=len(prompts), desc=desc, unit="seq", disable=not progress, leave=False)
    for batch in _batches(order, decoding.batch_size):
        rows = [encoded[i] for i in batch]
        ids, mask = _pad_left(rows, pad_id)
        kwargs: dict[str, Any] = {
            "max_new_tokens": decoding.max_new_tokens,
            "do_sample": False,
            "pad_token_id": pad_id,
            "eos_token_id": list(lm.policy.stop_token_ids),
            "num_beams": 1,
            "top_p": None,
            "top_k": None,
            "temperature": None,
        }
        if decoding.stop_strings:
            kwargs["stopping_criteria"] = StoppingCriteriaList(
                [stop_string_criteria(lm, decoding.stop_strings)]
            )
        if decoding.do_sample:
            per_row = [row_seed(seeds[i], prompts[i]) for i in batch]
            kwargs["logits_processor"] = LogitsProcessorList(
                [PerRowGumbelSampler(per_row, decoding.temperature, decoding.top_p, decoding.top_k)]
            )
        if decoding.loop == LOOP_SHRINKING:
            new = _decode_shrinking(model, ids.to(device), mask.to(device), kwargs)
        else:
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
            new = out[:, ids.shape[1] :].tolist()
        for j, i in enumerate(batch):
            results[i] = finished_generation(lm, prompts[i], encoded[i], new[j], decoding, seeds[i])
            n_tokens += results[i].n_new_tokens
        bar.update(len(batch))
        bar.set_postfix(tok_s=f"{n_tokens / max(time.perf_counter() - t0, 1e-9):.1f}")
    bar.close()
    return [r for r in results if r is not None]


def single_token_id(lm: LoadedModel, text: str) -> int:
    """The id of ``text`` as ONE continuation token (e.g. " Yes"); raises if it is several."""
    ids = lm.tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"{text!r} is {len(ids)} tokens for this tokenizer, not one: {ids}")
    return ids[0]
