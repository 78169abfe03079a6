"""A strong in-context baseline: the base_icl arm's demonstrations are CHOSEN for the model on
a dev split, so a trained arm that beats it beats the best prompt we could find, not a weak one.

The dev split is disjoint from the test prompts in everything the test varies: other tasks
(``DEV_TASKS``, none in ``utils.eval_prompts.TASKS``), the TRAINING phrasings of every
constraint type (never the evaluation's) and the training parameter pools. Every constraint
type is included, held-out ones too: base_icl is a baseline, not a trained arm, and the
strongest baseline knows every rule by demonstration.

Candidates (``ICL_CANDIDATES``) vary the number of demonstrations and a URIAL-style plain-text
preamble (Lin et al. 2023, "The Unlocking Spell on Base LLMs": a short header saying what the
examples are, then stylistic demonstrations; completion style, no chat template). The one with
the highest dev prompt-level strict accuracy wins (ties: fewer demonstrations, then no
preamble), and the choice with every candidate's dev accuracy goes into the report.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from utils.constraint_library import LIBRARY, render
from utils.eval_prompts import TASKS, icl_examples, score_response
from utils.response_format import EXAMPLE_SEPARATOR, clean_response, format_few_shot_prompt
from utils.verifiable_checks import CONFLICTS, EXCLUSIVE_TYPES

DEV_TASKS: tuple[str, ...] = (
    "Describe a bakery early in the morning.",
    "Explain why leaves fall in autumn.",
    "Give advice to someone moving to a new town.",
    "Describe an old wooden boat.",
    "Explain how a refrigerator keeps food cold.",
    "Give tips for a picnic in the park.",
    "Describe a busy airport.",
    "Explain why people wear sunscreen.",
    "Write a short note inviting a friend to dinner.",
    "Describe a field of sunflowers.",
    "Explain how a candle burns.",
    "Give advice for learning to swim.",
    "Describe a small fishing village.",
    "Explain why dogs wag their tails.",
    "Write a short welcome message for a hotel.",
    "Describe a foggy morning.",
    "Explain what an echo is.",
    "Give tips for writing a letter.",
    "Describe a bicycle shop.",
    "Explain why bread rises.",
    "Describe a school library.",
    "Explain how a kite flies.",
    "Give advice for a long hike.",
    "Describe a garden after rain.",
)

URIAL_PREAMBLE = (
    "Below are instructions, each followed by a response written by a careful assistant. Each "
    "response answers the request and follows every rule stated in the instruction exactly: "
    "its length, its format, its letter case, the words it must use or avoid, and how it must "
    "start or end."
)

# name -> (number of demonstrations from utils.eval_prompts.ICL_RECORDS, preamble or "")
ICL_CANDIDATES: dict[str, tuple[int, str]] = {
    "icl3": (3, ""),
    "icl6": (6, ""),
    "icl9": (9, ""),
    "urial3": (3, URIAL_PREAMBLE),
    "urial6": (6, URIAL_PREAMBLE),
}


def candidate_prompt_parts(name: str) -> tuple[str, list[tuple[str, str]]]:
    """(preamble, demonstrations) of an ICL candidate."""
    if name not in ICL_CANDIDATES:
        raise ValueError(f"unknown ICL candidate {name!r}; known: {sorted(ICL_CANDIDATES)}")
    k, preamble = ICL_CANDIDATES[name]
    return preamble, icl_examples()[:k]


def icl_prompt(preamble: str, demos: Sequence[tuple[str, str]], instruction: str) -> str:
    """The base_icl prompt: optional preamble, the demonstrations, the open prompt."""
    body = format_few_shot_prompt(demos, instruction)
    return f"{preamble}{EXAMPLE_SEPARATOR}{body}" if preamble else body


def build_dev_set(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` dev prompts: DEV_TASKS with one (sometimes two) constraints of ANY type in a
    TRAINING phrasing, types balanced."""
    assert not set(DEV_TASKS) & set(TASKS)
    rng = random.Random(seed)
    types = sorted(LIBRARY)
    out = []
    for k in range(n):
        t = types[k % len(types)]
        ids = [t]
        if rng.random() < 0.3 and t not in EXCLUSIVE_TYPES:
            partners = [u for u in types if u != t and u not in EXCLUSIVE_TYPES
                        and frozenset((t, u)) not in CONFLICTS]  # fmt: skip
            ids.append(rng.choice(partners))
        task = DEV_TASKS[k % len(DEV_TASKS)]
        kwargs = [LIBRARY[i].sample_train(rng, task) for i in ids]
        sentences = [
            render(rng.choice(LIBRARY[i].train_phrasings), kw)
            for i, kw in zip(ids, kwargs, strict=True)
        ]
        out.append({"id": f"dev-{k}", "prompt": " ".join([task, *sentences]),
                    "instruction_ids": ids, "kwargs": kwargs})  # fmt: skip
    return out


def choose(dev_accuracy: Mapping[str, float]) -> str:
    """The winning candidate: highest accuracy; ties to fewer demonstrations, then no preamble."""
    return max(
        dev_accuracy,
        key=lambda n: (dev_accuracy[n], -ICL_CANDIDATES[n][0], not ICL_CANDIDATES[n][1]),
    )


def select_icl(
    generate_texts: Callable[[list[str]], list[str]],
    candidates: Sequence[str],
    n_dev: int,
    seed: int,
) -> dict[str, Any]:
    """Score every candidate on the dev set with ``generate_texts`` (the evaluation's greedy
    decoding on the base weights) and return the choice and the table."""
    dev = build_dev_set(n_dev, seed)
    table = {}
    for name in candidates:
        preamble, demos = candidate_prompt_parts(name)
        texts = generate_texts([icl_prompt(preamble, demos, r["prompt"]) for r in dev])
        hits = [
            score_response(r, clean_response(t))["prompt_strict"]
            for r, t in zip(dev, texts, strict=True)
        ]
        table[name] = round(sum(hits) / len(hits), 4)
    chosen = choose(table)
    return {"chosen": chosen, "dev_accuracy": table, "n_dev": len(dev), "dev_seed": seed}
