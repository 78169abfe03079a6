"""The constitution evaluation of every arm, beside instruction following (issue: a
constitutional stage must be measured on the constitution, not only on verifiable rules).

Per arm, on the model state the arm evaluates (base weights, or base + its adapter):

* harmful requests (``configs/constitution_eval/harmful.jsonl``): greedy answer in the shared
  format, scored by ``utils.constitution_eval.safe_handling`` (a LOWER bound: string markers);
* over-refusal (``overrefusal.jsonl``): the same detector on benign requests that look
  sensitive; lower is better;
* principle preference (``principles.jsonl``, TEST split): does the arm's own mean per-token
  log-likelihood prefer the response that follows the principle? The policy read as an implicit
  reward model;
* a boilerplate monitor: the share of the arm's answers that share its most common stock phrase.

Each measure is paired across arms (same items), so arms are compared with the project's paired
statistics (exact McNemar, paired bootstrap, Holm across all pairs of arms per measure).
Generations and margins are cached per arm under ``<eval>/cache/constitution-<key>.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from utils import stats
from utils.constitution_eval import (
    HARMFUL_PATH,
    OVERREFUSAL_PATH,
    PRINCIPLES_PATH,
    boilerplate_share,
    load_principle_items,
    load_requests,
    non_answer,
    over_refusal,
    safe_handling,
)
from utils.jsonl_io import write_json_atomic
from utils.provenance import config_hash
from utils.response_format import clean_response

MEASURES = ("harmful_safe", "overrefusal", "principle_preference")
SCHEMA = 1


def eval_items() -> dict[str, Any]:
    return {
        "harmful": load_requests(HARMFUL_PATH),
        "overrefusal": load_requests(OVERREFUSAL_PATH),
        "principles": [i for i in load_principle_items(PRINCIPLES_PATH) if i.split == "test"],
    }


def score_arm(generations: Mapping[str, Sequence[str]], margins: Sequence[float]) -> dict:
    """Per-item booleans of every measure from an arm's cached generations and margins."""
    harmful = [clean_response(t) for t in generations["harmful"]]
    benign = [clean_response(t) for t in generations["overrefusal"]]
    return {
        "harmful_safe": [safe_handling(r) for r in harmful],
        "harmful_non_answer": sum(non_answer(r) for r in harmful),
        "overrefusal": [over_refusal(r) for r in benign],
        "principle_preference": [m > 0 for m in margins],
        "boilerplate": boilerplate_share(harmful + benign),
    }


def preference_margins(
    lm: Any, items: Sequence[Any], prompt_of: Callable[[str], str], batch_size: int = 8
) -> list[float]:
    """Mean per-token log-likelihood of ``follows`` minus that of ``breaks`` after the arm's
    own prompt for the instruction (``utils.constitution_eval.principle_margins`` with the
    arm's prompt format: base_icl keeps its demonstrations)."""
    from utils.response_format import format_completion
    from utils.scoring import completion_logprobs

    prefixes, completions = [], []
    for item in items:
        prompt = prompt_of(item.instruction)
        prefixes += [prompt, prompt]
        completions += [format_completion(item.follows), format_completion(item.breaks)]
    scored = completion_logprobs(lm, prefixes, completions, batch_size=batch_size)
    return [scored[2 * k][0] / scored[2 * k][1] - scored[2 * k + 1][0] / scored[2 * k + 1][1]
            for k in range(len(items))]  # fmt: skip


def arm_constitution(
    lm: Any,
    arm_key: Mapping[str, Any],
    prompt_of: Callable[[str], str],
    items: Mapping[str, Any],
    decoding: Any,
    cache_dir: Path,
    progress: bool = False,
) -> dict[str, Any]:
    """Generations (harmful + benign requests) and principle margins of one arm, cached under
    a key of the model state, the prompt format, the decoding and the items."""
    from utils.generation import generate

    key = config_hash({**arm_key, "schema": SCHEMA, "decoding": decoding.to_dict(),
                       "example_prompt": prompt_of("x"),
                       "items": config_hash({k: [repr(i) for i in v] for k, v in items.items()})})[:24]  # fmt: skip
    path = cache_dir / f"constitution-{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    out: dict[str, Any] = {"key": key}
    for name in ("harmful", "overrefusal"):
        prompts = [prompt_of(r.request) for r in items[name]]
        gens = generate(lm, prompts, decoding, progress=progress, desc=f"constitution {name}")
        out[name] = [g.text for g in gens]
    out["principle_margins"] = preference_margins(lm, items["principles"], prompt_of)
    cache_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, out)
    return out


def compare(per_arm: Mapping[str, Mapping[str, Any]], config: Any) -> dict[str, Any]:
    """Wilson summaries and paired comparisons (Holm across all pairs) per measure."""
    out: dict[str, Any] = {}
    for measure in MEASURES:
        success = {arm: list(s[measure]) for arm, s in per_arm.items()}
        out[measure] = {
            "summaries": {a: stats.summarize_arm(v, config.confidence) for a, v in success.items()},
            "comparisons": stats.compare_arms(
                success, n_resamples=config.bootstrap_resamples,
                confidence=config.confidence, seed=config.bootstrap_seed,
            ) if len(success) >= 2 else [],
        }  # fmt: skip
    out["boilerplate"] = {a: s["boilerplate"] for a, s in per_arm.items()}
    out["harmful_non_answers"] = {a: s["harmful_non_answer"] for a, s in per_arm.items()}
    return out


def run_constitution_eval(
    arms: Sequence[Any],
    arm_context: Callable[[Any], Any],
    arm_keys: Mapping[str, Mapping[str, Any]],
    prompt_of: Callable[[Any, str], str],
    config: Any,
    cache_dir: Path,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every arm through ``arm_context(spec)`` (a context manager yielding the loaded model in
    that arm's state) and its prompt format ``prompt_of(spec, text)``, then the paired
    statistics. The model is loaded only for an arm whose results are not cached."""
    items = eval_items()
    decoding = config.decoding()
    per_arm: dict[str, Any] = {}
    for spec in arms:
        with arm_context(spec) as lm:
            raw = arm_constitution(lm, arm_keys[spec.name], lambda t, s=spec: prompt_of(s, t),
                                   items, decoding, cache_dir, config.progress)  # fmt: skip
        per_arm[spec.name] = score_arm(raw, raw["principle_margins"])
        log(f"constitution {spec.name}: safe {sum(per_arm[spec.name]['harmful_safe'])}/"
            f"{len(items['harmful'])}, over-refusal {sum(per_arm[spec.name]['overrefusal'])}/"
            f"{len(items['overrefusal'])}, principle preference "
            f"{sum(per_arm[spec.name]['principle_preference'])}/{len(items['principles'])}")  # fmt: skip
    return {
        "n": {k: len(v) for k, v in items.items()},
        "detector": "string markers (AdvBench-style): a lower bound of safe handling",
        **compare(per_arm, config),
    }
