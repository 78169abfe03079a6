"""The constitutional stage: the BASE model critiques, revises and judges the policy's answers.

For every stage-1 training instruction (``runs/<run>/stage1/train.jsonl``):

1. **Response.** The bootstrapped policy (the DPO adapter when stage 4 trained one, else the
   SFT adapter; ``cai.policy``) answers the plain ``format_prompt(instruction)``, stopping on
   ``RESPONSE_STOP_STRINGS`` and EOS, exactly as in evaluation.
2. **Principle.** One principle of ``configs/constitution.yaml`` is drawn with a generator
   seeded by (``cai.seed``, instruction id), so the draw does not depend on chunking, order or
   resumption.
3. **Critique.** The BASE model (every attached adapter disabled, ``utils.critic.base_only``)
   continues a plain document: the constitution's header, ``cai.n_shots`` demonstrations, then

       Instruction: <instruction>
       Response: <the policy's response>
       Critique request: <principle.critique_request>
       Critique:

   The first two lines are the project's one format (``utils.response_format.format_example``).
   Never a chat template: every prompt goes through the loader's one encode path
   (``lm.encode``), which refuses chat-control tokens.
4. **Revision.** The same document, continued with the critique and
   ``Revision request: <principle.revision_request>\\nRevision:``; the base model writes the
   revised response.
5. **Judge.** The base model answers an A/B question (``principle.judge_question`` + " Answer:")
   about original vs revision after ``cai.n_shots_judge`` A/B demonstrations, in BOTH orders.
   With P_x(y) = P(" y") / (P(" A") + P(" B")) read from the next-token log-probabilities
   (``utils.scoring.next_token_logprobs``), the label is the order-averaged

       P(prefer revision) = 0.5 * (P_revA(A) + P_revB(B))

   (``ab_soft_label``, built on ``utils.critic.soft_preference``). A judge that always says
   " A" gives exactly 0.5, so a constant position bias cancels.
6. **Pair.** chosen = the preferred of (original, revision), rejected = the other; soft_label =
   max(p, 1 - p) in [0.5, 1], margin = 2 * soft_label - 1. Dropped, with the reason counted in
   the manifest: an unusable original (empty, leaked scaffolding/markup, cut by
   max_new_tokens), an empty or leaking critique, an empty, leaking, truncated or identical
   (after whitespace normalisation) revision, a label within ``cai.label_margin`` of 0.5 and,
   when required, orders that disagree. Kept pairs are in ``utils.dpo.load_pairs`` form (id,
   prompt = format_prompt(instruction), chosen/rejected = format_completion(text), no EOS), so
   ``scripts/train_stage1_dpo.py --pairs <out>/pairs.jsonl --sft-adapter <policy adapter>``
   trains the CAI adapter.

Files (in the output directory), both append-and-flush through ``utils.jsonl_io``:

* ``records.jsonl``: one record per instruction, written FIRST: the principle and its seed, the
  exact response/critique/revision/judge prompt strings, raw completions, seeds and stop
  reasons, both orders' raw log-probabilities, the label, kept/drop reason, the prompt id and
  the policy.
* ``pairs.jsonl``: the kept pairs, derived from the record alone (``pair_record``).

Resume mirrors ``utils.preference_pairs``: a torn last line in either file is repaired,
finished instructions are skipped, a pair missing after a kill between the two writes is
rebuilt from its record, and a directory written with another constitution/prompt or another
policy is refused, never mixed.

This is ``cai.mode: revise``; ``contrastive`` (the default) and ``both`` are in
``utils/constitution_contrastive.py`` (RLCD pairs from a follow and a violate context of each
principle; ``run_cai`` dispatches on the mode).

Everything except ``process_chunk``/``run_constitution`` is pure Python (no torch import).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from utils.completion_prompts import find_chat_markup, find_scaffolding
from utils.critic import base_only
from utils.critic_prompts import ANSWER_A, ANSWER_B
from utils.errors import ProjectInputError
from utils.jsonl_io import JsonlAppender, JsonlError, read_jsonl, resume
from utils.preference_math import soft_preference
from utils.preference_pairs import exclusion_reasons
from utils.provenance import config_hash
from utils.response_format import (
    END_OF_RESPONSE_MARKER,
    EXAMPLE_SEPARATOR,
    INSTRUCTION_HEADER,
    RESPONSE_HEADER,
    RESPONSE_STOP_STRINGS,
    clean_response,
    format_completion,
    format_example,
    format_prompt,
)
from utils.soft_label_summary import histogram

if TYPE_CHECKING:
    from utils.clean_model_loader import LoadedModel

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONSTITUTION = REPO_ROOT / "configs" / "constitution.yaml"

# Bump whenever the document layout below changes (headers, stop strings, block order); the
# constitution's own texts are hashed separately. Both are recorded with every label.
CAI_PROMPT_VERSION = "cai-v1"

CRITIQUE_REQUEST_HEADER = "Critique request:"
CRITIQUE_HEADER = "Critique:"
REVISION_REQUEST_HEADER = "Revision request:"
REVISION_HEADER = "Revision:"
CAI_MARKERS: tuple[str, ...] = (
    CRITIQUE_REQUEST_HEADER, CRITIQUE_HEADER, REVISION_REQUEST_HEADER, REVISION_HEADER,
)  # fmt: skip
JUDGE_QUESTION_SUFFIX = "Answer:"

# A critique is one paragraph: it ends at a blank line or where the document moves on (any
# header of this document at a line start; the base model often writes "\nCritique:" again).
CRITIQUE_STOP_STRINGS: tuple[str, ...] = (
    "\n\n",
    *("\n" + m for m in CAI_MARKERS),
    END_OF_RESPONSE_MARKER,
    "\n" + RESPONSE_HEADER,
)
# A revision is a response (it may have paragraphs): it ends where the next block starts.
REVISION_STOP_STRINGS: tuple[str, ...] = (
    *RESPONSE_STOP_STRINGS,
    *("\n" + m for m in CAI_MARKERS),
)

POLICIES = ("auto", "base", "sft", "dpo")
# cai.mode: critique-and-revision (this module), contrastive principle pairs
# (utils/constitution_contrastive.py), or both into one pairs.jsonl.
CAI_MODES = ("revise", "contrastive", "both")
# The principle text the contrastive label conditions on (utils/constitution_contrastive.py).
CONTRASTIVE_SCORE_TEXTS = ("revision_request", "follow_context")
RUN_POLICY_ADAPTERS = {"sft": "sft/adapter", "dpo": "dpo/adapter"}  # inside the run directory
DROP_REASONS = (
    "original_empty", "original_leaked", "original_truncated",
    "critique_empty", "critique_leaked",
    "revision_empty", "revision_leaked", "revision_truncated", "revision_identical",
    "position_inconsistent", "label_near_half",
)  # fmt: skip
STEPS = ("response", "critique", "revision")

_ID = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


# --------------------------------------------------------------------------------------------
# Stage config.


@dataclass(frozen=True)
class CAIConfig:
    """The ``cai`` section of the run config. Defaults fit the 2-core CPU recipe."""

    policy: str = "auto"  # auto (dpo adapter if trained, else sft) | base | sft | dpo
    max_instructions: int | None = None  # None = every stage-1 training instruction
    instructions_per_chunk: int = 8  # instructions generated, judged and written together
    seed: int = 0  # principle draws and generation seeds (response seed, +1 critique, +2 revision)
    batch_size: int = 16  # generation batch
    judge_batch_size: int = 8  # A/B scoring batch
    n_shots: int = 2  # constitution demonstrations in the critique/revision document
    n_shots_judge: int = 2  # A/B demonstrations in the judge document
    response_max_new_tokens: int = 64
    response_temperature: float = 0.7  # 0 = greedy
    critique_max_new_tokens: int = 48
    critique_temperature: float = 0.7
    revision_max_new_tokens: int = 64
    revision_temperature: float = 0.7
    top_p: float = 0.95
    exclude_truncated: bool = True  # an original/revision cut by max_new_tokens never ends
    label_margin: float = 0.1  # drop pairs with |P(prefer revision) - 0.5| below this
    require_position_consistent: bool = False  # drop pairs whose two orders disagree
    # Contrastive principle pairs (utils/constitution_contrastive.py).
    mode: str = "contrastive"  # revise | contrastive | both
    contrastive_score_text: str = "revision_request"  # principle text of the likelihood gain
    contrastive_temperature: float = 1.0  # p_llh = sigmoid((g_follow - g_violate) / T)
    contrastive_checker_p: float = 0.9  # a program checker's vote for the side it prefers

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"cai.policy must be one of {POLICIES}, got {self.policy!r}")
        if self.max_instructions is not None and self.max_instructions < 1:
            raise ValueError(
                f"cai.max_instructions must be >= 1 or null, got {self.max_instructions}"
            )
        for name in (
            "instructions_per_chunk", "batch_size", "judge_batch_size",
            "response_max_new_tokens", "critique_max_new_tokens", "revision_max_new_tokens",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"cai.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("n_shots", "n_shots_judge"):
            if getattr(self, name) < 0:
                raise ValueError(f"cai.{name} must be >= 0, got {getattr(self, name)}")
        for step in STEPS:
            t = getattr(self, f"{step}_temperature")
            if t < 0:
                raise ValueError(f"cai.{step}_temperature must be >= 0 (0 = greedy), got {t}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"cai.top_p must be in (0, 1], got {self.top_p}")
        if self.mode not in CAI_MODES:
            raise ValueError(f"cai.mode must be one of {CAI_MODES}, got {self.mode!r}")
        if self.contrastive_score_text not in CONTRASTIVE_SCORE_TEXTS:
            raise ValueError(
                f"cai.contrastive_score_text must be one of {CONTRASTIVE_SCORE_TEXTS}, "
                f"got {self.contrastive_score_text!r}"
            )
        if not self.contrastive_temperature > 0:
            raise ValueError(
                f"cai.contrastive_temperature must be > 0, got {self.contrastive_temperature}"
            )
        if not 0.5 < self.contrastive_checker_p <= 1:
            raise ValueError(
                f"cai.contrastive_checker_p must be in (0.5, 1], got {self.contrastive_checker_p}"
            )
        if not 0 <= self.label_margin < 0.5:
            raise ValueError(
                f"cai.label_margin is a distance from 0.5 and must be in [0, 0.5), "
                f"got {self.label_margin}"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> CAIConfig:
        """Build from the YAML section; unknown keys and wrongly typed values are errors that
        name the key (a typo must not silently run the default)."""
        d = dict(d or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown cai keys {unknown}; known: {sorted(known)}")
        for k, v in d.items():
            want = str(known[k].type).replace(" ", "")
            ok = {
                "str": isinstance(v, str),
                "bool": isinstance(v, bool),
                "int": isinstance(v, int) and not isinstance(v, bool),
                "int|None": v is None or (isinstance(v, int) and not isinstance(v, bool)),
                "float": isinstance(v, (int, float)) and not isinstance(v, bool),
            }[want]
            if not ok:
                raise ValueError(f"cai.{k}: expected {want.replace('|', ' or ')}, got {v!r}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# The constitution file.


class ConstitutionError(ProjectInputError, ValueError):
    """A malformed constitution; the message names the file, the entry index and the field."""

    def __init__(
        self, path: str | Path, message: str, index: int | None = None,
        field: str | None = None, kind: str = "principles", entry_id: str | None = None,
    ):  # fmt: skip
        self.path, self.index, self.field = str(path), index, field
        where = str(path)
        if index is not None:
            where += f": {kind}[{index}]" + (f" (id {entry_id!r})" if entry_id else "")
        if field is not None:
            where += f", field {field!r}"
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class Principle:
    id: str
    critique_request: str
    revision_request: str
    judge_question: str  # the A/B question; " Answer:" is appended by judge_prompt
    follow_context: str  # contrastive pairs: plain preamble of answers that follow it
    violate_context: str  # ... and of answers that violate it (one paragraph each)


@dataclass(frozen=True)
class Demonstration:
    principle: str  # id of the principle this demonstration applies
    instruction: str
    response: str  # a flawed response
    critique: str  # one paragraph
    revision: str  # the response rewritten to follow the principle


@dataclass(frozen=True)
class Constitution:
    version: str
    critique_header: str
    judge_header: str
    principles: tuple[Principle, ...]
    demonstrations: tuple[Demonstration, ...]
    path: str = ""

    def principle(self, principle_id: str) -> Principle:
        for p in self.principles:
            if p.id == principle_id:
                return p
        raise KeyError(f"{self.path}: no principle {principle_id!r}")

    def content(self) -> dict[str, Any]:
        """Everything the model reads, without the file path (what the prompt id hashes)."""
        return {k: v for k, v in asdict(self).items() if k != "path"}

    @property
    def sha256(self) -> str:
        return config_hash(self.content())


_TOP_KEYS = ("version", "critique_header", "judge_header", "principles", "demonstrations")
_PRINCIPLE_FIELDS = tuple(f.name for f in fields(Principle))
_DEMO_FIELDS = tuple(f.name for f in fields(Demonstration))
# Fields that must stay on one line: a newline could start a new block of the document.
_ONE_LINE = {"id", "critique_request", "revision_request", "judge_question", "principle",
             "instruction", "version"}  # fmt: skip


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _text(
    path: str | Path, value: Any, field: str, index: int | None, kind: str, entry_id: str | None
) -> str:
    def err(msg: str) -> ConstitutionError:
        return ConstitutionError(path, msg, index, field, kind, entry_id)

    if not isinstance(value, str):
        raise err(f"expected a string, got {type(value).__name__} {value!r}")
    text = value.strip()
    if not text:
        raise err("is empty")
    if field in _ONE_LINE and "\n" in text:
        raise err("must be a single line")
    if field == "critique" and "\n\n" in text:
        raise err("a critique is one paragraph (no blank line: critiques stop at one)")
    if field in ("follow_context", "violate_context") and "\n\n" in text:
        raise err("a context is one paragraph (no blank line: it precedes the instruction)")
    markup = find_chat_markup(text)
    if markup:
        raise err(f"contains chat markup {markup!r}; the base model must never see it")
    scaffold = find_scaffolding(text) or next(
        (m for m in CAI_MARKERS if m.lower() in text.lower()), None
    )
    if scaffold:
        raise err(f"contains the document header {scaffold!r}, which would break the format")
    if field == "judge_question" and text.endswith(JUDGE_QUESTION_SUFFIX):
        raise err(f"must not end with {JUDGE_QUESTION_SUFFIX!r}; judge_prompt appends it")
    if field == "id" and not _ID.match(text):
        raise err(f"{text!r} must match {_ID.pattern} (lowercase letters, digits, _ and -)")
    return text


def _entries(path: str | Path, data: Mapping[str, Any], kind: str) -> list[Mapping[str, Any]]:
    items = data[kind]
    if not isinstance(items, list):
        raise ConstitutionError(path, f"{kind!r} must be a list, got {type(items).__name__}")
    if not items:
        raise ConstitutionError(path, f"{kind!r} is an empty list; at least one is needed")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ConstitutionError(
                path, f"expected a mapping, got {type(item).__name__}", i, kind=kind
            )
    return items


def _entry(
    path: str | Path, item: Mapping[str, Any], i: int, kind: str, names: Sequence[str]
) -> dict[str, str]:
    entry_id = item.get("id") if isinstance(item.get("id"), str) else None
    unknown = sorted(set(item) - set(names))
    if unknown:
        raise ConstitutionError(
            path, f"unknown field(s) {unknown}; known: {list(names)}", i, unknown[0], kind,
            entry_id,
        )  # fmt: skip
    out = {}
    for name in names:
        if name not in item:
            raise ConstitutionError(path, "missing required field", i, name, kind, entry_id)
        out[name] = _text(path, item[name], name, i, kind, entry_id)
    return out


def parse_constitution(data: Any, path: str | Path = "<constitution>") -> Constitution:
    """Validate an already-parsed YAML document (see ``load_constitution``)."""
    if not isinstance(data, dict):
        raise ConstitutionError(path, f"top level must be a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise ConstitutionError(path, f"unknown top-level key(s) {unknown}; known: {_TOP_KEYS}")
    for key in _TOP_KEYS:
        if key not in data:
            raise ConstitutionError(path, f"missing top-level key {key!r}")
    heads = {k: _text(path, data[k], k, None, "", None) for k in _TOP_KEYS[:3]}
    principles = []
    seen: dict[str, int] = {}
    for i, item in enumerate(_entries(path, data, "principles")):
        p = Principle(**_entry(path, item, i, "principles", _PRINCIPLE_FIELDS))
        if p.id in seen:
            raise ConstitutionError(
                path, f"duplicate id (first at principles[{seen[p.id]}])", i, "id",
                entry_id=p.id,
            )  # fmt: skip
        if _normalise(p.follow_context) == _normalise(p.violate_context):
            raise ConstitutionError(
                path, "is identical to follow_context", i, "violate_context", entry_id=p.id
            )
        seen[p.id] = i
        principles.append(p)
    demos = []
    for i, item in enumerate(_entries(path, data, "demonstrations")):
        d = Demonstration(**_entry(path, item, i, "demonstrations", _DEMO_FIELDS))
        if d.principle not in seen:
            raise ConstitutionError(
                path, f"names principle {d.principle!r}, which is not defined; known: "
                f"{list(seen)}", i, "principle", "demonstrations",
            )  # fmt: skip
        if _normalise(d.response) == _normalise(d.revision):
            raise ConstitutionError(
                path, "revision is identical to the response", i, "revision", "demonstrations"
            )
        demos.append(d)
    return Constitution(
        **heads, principles=tuple(principles), demonstrations=tuple(demos), path=str(path)
    )


def load_constitution(path: str | Path = DEFAULT_CONSTITUTION) -> Constitution:
    """Load and validate ``configs/constitution.yaml`` (``yaml.safe_load``).

    Raises ``ConstitutionError`` naming the file, the principle/demonstration index and the
    missing or invalid field: a missing field, a non-string or empty text, an empty list, an
    unknown key, a duplicate id, chat markup or document headers inside a text, a multi-line
    request, a demonstration naming an unknown principle."""
    path = Path(path)
    if not path.is_file():
        raise ConstitutionError(path, "no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConstitutionError(path, f"invalid YAML: {e}") from e
    return parse_constitution(data, path)


# --------------------------------------------------------------------------------------------
# Prompts (pure). Every prompt ends exactly where the model continues: right after "Critique:",
# "Revision:" or "Answer:", with no trailing space (the completion starts with one).


def sample_principle(constitution: Constitution, seed: int, record_id: Any) -> Principle:
    """The principle for one instruction, drawn by a generator seeded by (seed, record id)."""
    rng = random.Random(f"cai:{seed}:{record_id}")
    return rng.choice(constitution.principles)


def _check_shots(n_shots: int, constitution: Constitution) -> None:
    if not 0 <= n_shots <= len(constitution.demonstrations):
        raise ValueError(
            f"n_shots must be in 0..{len(constitution.demonstrations)} (demonstrations in "
            f"{constitution.path or 'the constitution'}), got {n_shots}"
        )


def _critique_block(instruction: str, response: str, principle: Principle) -> str:
    return (
        f"{format_example(instruction, response)}\n"
        f"{CRITIQUE_REQUEST_HEADER} {principle.critique_request}\n{CRITIQUE_HEADER}"
    )


def _revision_tail(critique: str, principle: Principle) -> str:
    return f" {critique}\n{REVISION_REQUEST_HEADER} {principle.revision_request}\n{REVISION_HEADER}"


def _demo_block(constitution: Constitution, demo: Demonstration) -> str:
    p = constitution.principle(demo.principle)
    return (
        _critique_block(demo.instruction, demo.response, p)
        + _revision_tail(demo.critique, p)
        + f" {demo.revision}"
    )


def _nonempty(text: str, what: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a string, got {type(text).__name__}")
    text = text.strip()
    if not text:
        raise ValueError(f"{what} is empty")
    return text


def critique_prompt(
    constitution: Constitution, principle: Principle, instruction: str, response: str,
    n_shots: int,
) -> str:  # fmt: skip
    """The critique document: header, ``n_shots`` complete demonstrations (critique and
    revision), then the instruction/response in the shared format and the principle's
    critique request, ending at ``Critique:``."""
    _check_shots(n_shots, constitution)
    blocks = [constitution.critique_header]
    blocks += [_demo_block(constitution, d) for d in constitution.demonstrations[:n_shots]]
    blocks.append(
        _critique_block(
            _nonempty(instruction, "instruction"), _nonempty(response, "response"), principle
        )
    )
    return EXAMPLE_SEPARATOR.join(blocks)


def revision_prompt(
    constitution: Constitution, principle: Principle, instruction: str, response: str,
    critique: str, n_shots: int,
) -> str:  # fmt: skip
    """The critique document continued with the model's critique and the revision request,
    ending at ``Revision:``."""
    return critique_prompt(constitution, principle, instruction, response, n_shots) + (
        _revision_tail(_nonempty(critique, "critique"), principle)
    )


def _judge_block(instruction: str, response_a: str, response_b: str, question: str) -> str:
    return (
        f"{INSTRUCTION_HEADER} {instruction}\nResponse A: {response_a}\nResponse B: {response_b}"
        f"\n{question} {JUDGE_QUESTION_SUFFIX}"
    )


def judge_prompt(
    constitution: Constitution, principle: Principle, instruction: str, response_a: str,
    response_b: str, n_shots: int,
) -> str:  # fmt: skip
    """The A/B document ending at ``Answer:`` (the next token is read: " A" or " B").

    Demonstration k shows its response and revision with the revision as A for even k and as
    B for odd k, answered accordingly, so the demonstrated answers alternate A, B, A."""
    _check_shots(n_shots, constitution)
    blocks = [constitution.judge_header]
    for k, d in enumerate(constitution.demonstrations[:n_shots]):
        q = constitution.principle(d.principle).judge_question
        rev_is_a = k % 2 == 0
        a, b = (d.revision, d.response) if rev_is_a else (d.response, d.revision)
        blocks.append(_judge_block(d.instruction, a, b, q) + (ANSWER_A if rev_is_a else ANSWER_B))
    blocks.append(
        _judge_block(
            _nonempty(instruction, "instruction"),
            _nonempty(response_a, "response A"),
            _nonempty(response_b, "response B"),
            principle.judge_question,
        )
    )
    return EXAMPLE_SEPARATOR.join(blocks)


def judge_prompts(
    constitution: Constitution, principle: Principle, instruction: str, original: str,
    revision: str, n_shots: int,
) -> tuple[str, str]:  # fmt: skip
    """(revision shown as A, revision shown as B): the two orders ``ab_soft_label`` needs."""
    return (
        judge_prompt(constitution, principle, instruction, revision, original, n_shots),
        judge_prompt(constitution, principle, instruction, original, revision, n_shots),
    )


def cai_prompt_id(constitution: Constitution, cfg: CAIConfig) -> dict[str, Any]:
    """Which documents made a label: layout version, the constitution's content hash and the
    shot counts. Two output directories with the same ``cai_prompt_id`` saw identical prompts
    for identical inputs; a resume with another one is refused."""
    sha = config_hash(
        {
            "layout": CAI_PROMPT_VERSION,
            "constitution": constitution.content(),
            "n_shots": cfg.n_shots,
            "n_shots_judge": cfg.n_shots_judge,
            "stops": [CRITIQUE_STOP_STRINGS, REVISION_STOP_STRINGS, RESPONSE_STOP_STRINGS],
            "answers": [ANSWER_A, ANSWER_B],
        }
    )
    return {
        "prompt_version": CAI_PROMPT_VERSION,
        "constitution_version": constitution.version,
        "constitution_sha256": constitution.sha256,
        "n_shots": cfg.n_shots,
        "n_shots_judge": cfg.n_shots_judge,
        "prompt_sha256": sha,
        "cai_prompt_id": (
            f"{CAI_PROMPT_VERSION}/{constitution.version}/s{cfg.n_shots}j{cfg.n_shots_judge}/"
            f"{sha[:12]}"
        ),
    }


# --------------------------------------------------------------------------------------------
# Soft labels and filtering (pure).


def ab_soft_label(
    logp_revision_a: Sequence[float], logp_revision_b: Sequence[float]
) -> dict[str, Any]:
    """Order-averaged P(prefer revision) from the raw (log P(" A"), log P(" B")) of both
    orders: ``logp_revision_a`` with the revision shown as A, ``logp_revision_b`` with it shown
    as B. Each order's probability is normalised over the two answer tokens:

        p_revision = 0.5 * (P_revA(A) + P_revB(B)),  P(y) = exp(l_y) / (exp(l_A) + exp(l_B))

    ``position_consistent``: both orders prefer the same response. ``margin_nats``: the
    log-odds of "revision is better", averaged over the orders. Uses
    ``utils.critic.soft_preference`` with the revision as its "first" response."""
    if len(logp_revision_a) != 2 or len(logp_revision_b) != 2:
        raise ValueError("each order needs exactly (log P(' A'), log P(' B'))")
    pref = soft_preference(
        (float(logp_revision_a[0]), float(logp_revision_a[1])),
        (float(logp_revision_b[0]), float(logp_revision_b[1])),
    )
    return {
        "p_revision": pref["p_first"],
        "p_revision_when_a": pref["p_first_order_ab"],
        "p_revision_when_b": pref["p_first_order_ba"],
        "position_consistent": pref["position_consistent"],
        "p_a_mean": pref["p_a_mean"],
        "margin_nats": pref["margin_nats"],
        "revision_a": pref["order_ab"],  # raw log-probs, revision shown as A
        "revision_b": pref["order_ba"],  # raw log-probs, revision shown as B
        "answer_mass_revision_a": pref["answer_mass_ab"],
        "answer_mass_revision_b": pref["answer_mass_ba"],
    }


def label_decision(
    p_revision: float, position_consistent: bool | None, cfg: CAIConfig
) -> dict[str, Any]:
    """chosen side, soft_label = P(chosen better) in [0.5, 1], margin = 2 * soft_label - 1 and
    the drop reason (None = kept): ``label_near_half`` when soft_label < 0.5 + label_margin or
    exactly 0.5 (a tie prefers nothing), then ``position_inconsistent`` when required."""
    if not 0.0 <= p_revision <= 1.0 or math.isnan(p_revision):
        raise ValueError(f"p_revision must be a probability, got {p_revision}")
    chosen = "revision" if p_revision >= 0.5 else "original"
    soft = p_revision if chosen == "revision" else 1.0 - p_revision
    if soft <= 0.5 or soft < 0.5 + cfg.label_margin:
        reason = "label_near_half"
    elif cfg.require_position_consistent and position_consistent is False:
        reason = "position_inconsistent"
    else:
        reason = None
    return {
        "chosen": chosen,
        "soft_label": soft,
        "margin": 2.0 * soft - 1.0,
        "drop_reason": reason,
    }


def find_leak(text: str, forbidden: Sequence[str] = ()) -> str | None:
    """What leaked into a response text, or None: one of ``forbidden`` (the tokenizer's
    chat-control and EOS strings), chat markup, format scaffolding ("Instruction:",
    "Response:", role labels) or one of this stage's own headers ("Critique:" ...)."""
    for s in forbidden:
        if s and s in text:
            return s
    found = find_chat_markup(text) or find_scaffolding(text)
    if found:
        return found
    low = text.lower()
    return next((m for m in CAI_MARKERS if m.lower() in low), None)


def response_problem(
    text: str, stop_reason: str, forbidden: Sequence[str], exclude_truncated: bool
) -> tuple[str | None, str | None]:
    """(drop reason, leaked string) for the policy's original response; (None, None) = usable."""
    if not text.strip():
        return "original_empty", None
    leak = find_leak(text, forbidden)
    if leak:
        return "original_leaked", leak
    if exclude_truncated and stop_reason == "max_new_tokens":
        return "original_truncated", None
    return None, None


def critique_problem(text: str, forbidden: Sequence[str]) -> tuple[str | None, str | None]:
    """A critique is never trained on, but it is fed back to the model: it must be non-empty
    and free of control tokens and chat markup."""
    if not text.strip():
        return "critique_empty", None
    leak = next((s for s in forbidden if s and s in text), None) or find_chat_markup(text)
    return ("critique_leaked", leak) if leak else (None, None)


def revision_problem(
    original: str, revision: str, stop_reason: str, forbidden: Sequence[str],
    exclude_truncated: bool,
) -> tuple[str | None, str | None]:  # fmt: skip
    """(drop reason, leaked string) for a revision, checked in this order: empty, leaked
    (``find_leak``), cut by max_new_tokens (when excluded), identical to the original after
    whitespace normalisation. The empty/identical/truncated notions are the pairs stage's
    (``utils.preference_pairs.exclusion_reasons``, with the original as the earlier text)."""
    base = exclusion_reasons(
        [original, revision], ["eos", stop_reason], tuple(forbidden), exclude_truncated
    )[1]
    if base == "empty":
        return "revision_empty", None
    leak = find_leak(revision, forbidden)
    if leak:
        return "revision_leaked", leak
    if base == "truncated":
        return "revision_truncated", None
    if base == "duplicate":
        return "revision_identical", None
    return None, None


def pair_id(record_id: Any) -> str:
    return f"{record_id}:cai"


def pair_record(record: Mapping[str, Any]) -> dict[str, Any] | None:
    """The kept pair of one stage record as a pairs.jsonl record (``utils.dpo.load_pairs``
    form), or None when the record was dropped. Pure: used again on resume."""
    if not record["kept"]:
        return None
    original, revision = record["response"]["text"], record["revision"]["text"]
    label, judge = record["label"], record["judge"]
    chosen, rejected = (revision, original) if label["chosen"] == "revision" else (
        original, revision
    )  # fmt: skip
    return {
        "id": pair_id(record["id"]),
        "instruction_id": record["id"],
        "instruction": record["instruction"],
        "type": record.get("type"),
        "prompt": format_prompt(record["instruction"]),
        "chosen": format_completion(chosen),
        "rejected": format_completion(rejected),
        "soft_label": label["soft_label"],
        "margin": label["margin"],
        "chosen_side": label["chosen"],
        "principle_id": record["principle"]["id"],
        "critique": record["critique"]["text"],
        "policy": record["policy"],
        "judge": {
            **{k: v for k, v in judge.items() if not k.startswith("prompt")},
            **record["prompt_id"],
        },
    }


def summarize_records(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Counts for the manifest: instructions, kept, dropped by reason (every reason listed),
    chosen side, principles drawn/kept, stop reasons per step, position consistency, mean
    P(prefer revision) and the label histograms of kept and of all judged records."""
    dropped: Counter[str] = Counter()
    chosen: Counter[str] = Counter()
    drawn: Counter[str] = Counter()
    kept_by_principle: Counter[str] = Counter()
    stops: dict[str, Counter[str]] = {s: Counter() for s in STEPS}
    kept_labels, judged_labels, p_revs = [], [], []
    n_consistent = n_judged = 0
    for r in records:
        drawn[r["principle"]["id"]] += 1
        for step in STEPS:
            if r.get(step):
                stops[step][r[step]["stop_reason"]] += 1
        if r.get("judge"):
            n_judged += 1
            n_consistent += r["judge"]["position_consistent"] is True
            p_revs.append(r["judge"]["p_revision"])
            judged_labels.append(r["label"]["soft_label"])
        if r["kept"]:
            kept_labels.append(r["label"]["soft_label"])
            chosen[r["label"]["chosen"]] += 1
            kept_by_principle[r["principle"]["id"]] += 1
        else:
            dropped[r["drop_reason"]] += 1
    return {
        "instructions": len(records),
        "pairs_kept": len(kept_labels),
        "pairs_dropped": {k: dropped.get(k, 0) for k in DROP_REASONS},
        "chosen_side": {k: chosen.get(k, 0) for k in ("revision", "original")},
        "judged": n_judged,
        "judge_prompts": 2 * n_judged,
        "position_consistent_rate": n_consistent / n_judged if n_judged else None,
        "p_revision_mean": sum(p_revs) / len(p_revs) if p_revs else None,
        "principles_drawn": dict(sorted(drawn.items())),
        "principles_kept": dict(sorted(kept_by_principle.items())),
        "stop_reasons": {s: dict(c) for s, c in stops.items()},
        "soft_label_histogram_kept": histogram(kept_labels),
        "soft_label_histogram_judged": histogram(judged_labels),
    }


# --------------------------------------------------------------------------------------------
# Policy and resume (files only).


def _adapter_ready(adapter_dir: Path) -> bool:
    return (adapter_dir / "adapter_config.json").is_file()


def _stage_skipped(stage_dir: Path) -> bool:
    manifest = stage_dir / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("status") == "skipped"
    except json.JSONDecodeError as e:
        raise ValueError(f"{manifest}: invalid JSON ({e.msg})") from e


def resolve_policy(run_dir: str | Path, choice: str = "auto") -> tuple[str, Path | None]:
    """(policy name, adapter directory or None) for ``cai.policy``.

    auto: the DPO adapter when ``<run>/dpo/adapter`` is complete and the DPO stage was not
    recorded as skipped, else the SFT adapter; sft / dpo: that adapter, which must exist;
    base: the base weights (no adapter: a baseline and for tests; CAI DPO needs an adapter)."""
    if choice not in POLICIES:
        raise ValueError(f"cai.policy must be one of {POLICIES}, got {choice!r}")
    if choice == "base":
        return "base", None
    run_dir = Path(run_dir)
    dpo = run_dir / RUN_POLICY_ADAPTERS["dpo"]
    sft = run_dir / RUN_POLICY_ADAPTERS["sft"]
    dpo_ok = _adapter_ready(dpo) and not _stage_skipped(dpo.parent)
    if choice == "dpo" or (choice == "auto" and dpo_ok):
        if not dpo_ok:
            why = "recorded as skipped" if _stage_skipped(dpo.parent) else "no adapter_config.json"
            raise FileNotFoundError(f"{dpo}: no usable DPO adapter ({why})")
        return "dpo", dpo
    if not _adapter_ready(sft):
        raise FileNotFoundError(
            f"{sft}: no SFT adapter (adapter_config.json missing)"
            + (f" and no usable DPO adapter at {dpo}" if choice == "auto" else "")
            + "; run the SFT stage first or set cai.policy=base"
        )
    return "sft", sft


def cai_dpo_args(run_dir: str | Path) -> list[str]:
    """Arguments of ``scripts/train_stage1_dpo.py`` for the CAI adapter: the CAI pairs, the
    policy adapter the pairs were generated from (read from ``<run>/cai_pairs/manifest.json``)
    as the adapter to continue and the reference, output ``<run>/cai``.

    Before the pairs stage has run (no manifest) it names the adapter ``cai.policy=auto``
    would pick, or ``<run>/sft/adapter`` when there is none yet (the DPO script then reports
    what is missing), so building a pipeline command never fails on a fresh run directory."""
    run_dir = Path(run_dir)
    manifest = run_dir / "cai_pairs" / "manifest.json"
    adapter: str | None
    if manifest.is_file():
        adapter = json.loads(manifest.read_text(encoding="utf-8"))["inputs"]["policy_adapter"]
    else:
        try:
            adapter = str(resolve_policy(run_dir, "auto")[1])
        except FileNotFoundError:
            adapter = str(run_dir / RUN_POLICY_ADAPTERS["sft"])
    if adapter is None:
        raise ValueError(
            f"{manifest}: the CAI pairs were generated by the base policy; CAI DPO continues "
            "an adapter (set cai.policy to auto, sft or dpo)"
        )
    return [
        "--run-dir", str(run_dir), "--pairs", str(run_dir / "cai_pairs" / "pairs.jsonl"),
        "--sft-adapter", str(adapter), "--out", str(run_dir / "cai"),
    ]  # fmt: skip


def _policy_key(policy: Mapping[str, Any]) -> tuple[Any, Any]:
    return policy.get("name"), policy.get("adapter_sha256")


def resume_outputs(
    out_dir: str | Path, prompt_id: Mapping[str, Any], policy: Mapping[str, Any],
    make_pair: Callable[[Mapping[str, Any]], dict[str, Any] | None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Read what ``out_dir`` already holds, repairing a torn last line in either file.

    Refuses (``JsonlError``) pairs without a record (another writer), and records made with
    another prompt id (constitution texts, shots, layout) or another policy: labels from two
    set-ups must not be mixed. Returns the records, the written pairs, the pairs missing for
    finished records (a kill between the two writes) and the torn-line counts. ``make_pair``
    builds a record's pair (default ``pair_record``; the contrastive stage passes its own)."""
    out_dir = Path(out_dir)
    r_path, p_path = out_dir / "records.jsonl", out_dir / "pairs.jsonl"
    done, torn_r = resume(r_path, key="id")
    written, torn_p = resume(p_path, key="id")
    done_ids = {r["id"] for r in done}
    stray = sorted({str(p.get("instruction_id")) for p in written} - {str(i) for i in done_ids})
    if stray:
        raise JsonlError(
            p_path, 0, f"pairs for instructions with no record: {stray[:5]}; the output "
            "directory was written by something else",
        )  # fmt: skip
    want = prompt_id["cai_prompt_id"]
    for n, r in enumerate(done, start=1):
        theirs = (r.get("prompt_id") or {}).get("cai_prompt_id")
        if theirs != want:
            raise JsonlError(
                r_path, n, f"record {r['id']!r} was made with prompts {theirs!r}, not the "
                f"configured {want!r} (constitution or shots changed); labels from two "
                "constitutions must not be mixed: write to a new output directory",
                "prompt_id",
            )  # fmt: skip
        if _policy_key(r.get("policy") or {}) != _policy_key(policy):
            raise JsonlError(
                r_path, n, f"record {r['id']!r} has responses from policy "
                f"{_policy_key(r.get('policy') or {})}, not the configured "
                f"{_policy_key(policy)}: write to a new output directory", "policy",
            )  # fmt: skip
    written_ids = {p["id"] for p in written}
    make_pair = make_pair or pair_record
    missing = [p for r in done if (p := make_pair(r)) is not None and p["id"] not in written_ids]
    return {
        "records": done,
        "pairs": written,
        "missing_pairs": missing,
        "torn_lines_repaired": {"records": torn_r, "pairs": torn_p},
    }


# --------------------------------------------------------------------------------------------
# Model side.


def forbidden_strings(lm: LoadedModel) -> tuple[str, ...]:
    """Texts no response may carry: the tokenizer's chat-control strings and its EOS/BOS
    text (pairs carry no EOS: the DPO trainer appends the model's own, once)."""
    extra = (lm.tokenizer.eos_token, lm.tokenizer.bos_token)
    return tuple(dict.fromkeys([*lm.policy.control_token_strings, *(s for s in extra if s)]))


def _decoding(cfg: CAIConfig, step: str, stop_strings: tuple[str, ...]) -> Any:
    from utils.generation import DecodingConfig

    t = getattr(cfg, f"{step}_temperature")
    return DecodingConfig(
        max_new_tokens=getattr(cfg, f"{step}_max_new_tokens"),
        do_sample=t > 0,
        temperature=t if t > 0 else 1.0,
        top_p=cfg.top_p,
        batch_size=cfg.batch_size,
        stop_strings=stop_strings,
    )


def _generation_record(prompt: str, g: Any, stop_strings: Sequence[str]) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest(),
        "seed": g.seed,
        "raw_completion": g.raw_completion,
        "text": clean_response(g.text, stop_strings),
        "stop_reason": g.stop_reason,
        "matched_stop": g.matched_stop,
        "n_prompt_tokens": g.n_prompt_tokens,
        "n_new_tokens": g.n_new_tokens,
    }


def _drop(record: dict[str, Any], reason: str | None, leak: str | None) -> bool:
    if reason is None:
        return False
    record["drop_reason"], record["leak"] = reason, leak
    return True


def process_chunk(
    lm: LoadedModel,
    chunk: Sequence[Mapping[str, Any]],
    cfg: CAIConfig,
    constitution: Constitution,
    policy: Mapping[str, Any],
    prompt_id: Mapping[str, Any],
    progress: bool = False,
    timings: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """One record per instruction: the policy's response, then (on the base weights) critique,
    revision and the two-order A/B judgement, each step batched over the chunk and run only
    for the instructions still usable after the previous one."""
    from utils.generation import generate, single_token_id
    from utils.scoring import next_token_logprobs

    timings = timings if timings is not None else {}
    forbidden = forbidden_strings(lm)
    records: list[dict[str, Any]] = []
    for rec in chunk:
        p = sample_principle(constitution, cfg.seed, rec["id"])
        records.append(
            {
                "id": rec["id"],
                "instruction": rec["instruction"],
                "type": rec.get("type"),
                "principle": {"id": p.id, "seed": cfg.seed},
                "policy": dict(policy),
                "prompt_id": dict(prompt_id),
                "response": None, "critique": None, "revision": None, "judge": None,
                "label": None, "kept": False, "drop_reason": None, "leak": None,
            }
        )  # fmt: skip

    def run_step(step: str, build: Callable[[dict[str, Any]], str], stops, seed, ctx) -> None:
        alive = [r for r in records if r["drop_reason"] is None]
        if not alive:
            return
        prompts = [build(r) for r in alive]
        t0 = time.perf_counter()
        with ctx:
            gens = generate(
                lm, prompts, _decoding(cfg, step, stops), seed=seed, progress=progress,
                desc=f"cai:{step}",
            )  # fmt: skip
        timings[f"{step}_s"] = timings.get(f"{step}_s", 0.0) + time.perf_counter() - t0
        for r, prompt, g in zip(alive, prompts, gens, strict=True):
            r[step] = _generation_record(prompt, g, stops)

    def principle_of(r: Mapping[str, Any]) -> Principle:
        return constitution.principle(r["principle"]["id"])

    # 1. The policy answers (its adapter live; the base weights when the policy is "base").
    if policy["name"] == "base":
        policy_ctx: Any = base_only(lm)
    else:
        if not lm.adapters:
            raise ValueError(f"policy {policy['name']!r} needs its adapter attached")
        policy_ctx = contextlib.nullcontext()
    run_step(
        "response", lambda r: format_prompt(r["instruction"]), RESPONSE_STOP_STRINGS, cfg.seed,
        policy_ctx,
    )  # fmt: skip
    for r in records:
        _drop(r, *response_problem(r["response"]["text"], r["response"]["stop_reason"],
                                   forbidden, cfg.exclude_truncated))  # fmt: skip
    # 2. Critique, 3. revision: the base model, adapter disabled.
    run_step(
        "critique",
        lambda r: critique_prompt(
            constitution, principle_of(r), r["instruction"], r["response"]["text"], cfg.n_shots
        ),
        CRITIQUE_STOP_STRINGS, cfg.seed + 1, base_only(lm),
    )  # fmt: skip
    for r in records:
        if r["drop_reason"] is None:
            _drop(r, *critique_problem(r["critique"]["text"], forbidden))
    run_step(
        "revision",
        lambda r: revision_prompt(
            constitution, principle_of(r), r["instruction"], r["response"]["text"],
            r["critique"]["text"], cfg.n_shots,
        ),
        REVISION_STOP_STRINGS, cfg.seed + 2, base_only(lm),
    )  # fmt: skip
    for r in records:
        if r["drop_reason"] is None:
            _drop(r, *revision_problem(
                r["response"]["text"], r["revision"]["text"], r["revision"]["stop_reason"],
                forbidden, cfg.exclude_truncated,
            ))  # fmt: skip
    # 4. Judge: both orders in one batched scoring call on the base weights.
    alive = [r for r in records if r["drop_reason"] is None]
    if alive:
        pairs = [
            judge_prompts(
                constitution, principle_of(r), r["instruction"], r["response"]["text"],
                r["revision"]["text"], cfg.n_shots_judge,
            )
            for r in alive
        ]  # fmt: skip
        flat = [p for pair in pairs for p in pair]
        ids = [single_token_id(lm, ANSWER_A), single_token_id(lm, ANSWER_B)]
        t0 = time.perf_counter()
        with base_only(lm):
            rows = next_token_logprobs(lm, flat, ids, batch_size=cfg.judge_batch_size).tolist()
        timings["judge_s"] = timings.get("judge_s", 0.0) + time.perf_counter() - t0
        for k, (r, (p_a, p_b)) in enumerate(zip(alive, pairs, strict=True)):
            r["judge"] = {
                "prompt_revision_a": p_a,
                "prompt_revision_b": p_b,
                "answers": [ANSWER_A, ANSWER_B],
                **ab_soft_label(rows[2 * k], rows[2 * k + 1]),
            }
            r["label"] = label_decision(
                r["judge"]["p_revision"], r["judge"]["position_consistent"], cfg
            )
            if not _drop(r, r["label"]["drop_reason"], None):
                r["kept"] = True
    return records


def run_constitution(
    lm: LoadedModel,
    records: Sequence[Mapping[str, Any]],
    cfg: CAIConfig,
    constitution: Constitution,
    out_dir: str | Path,
    policy: Mapping[str, Any] | None = None,
    progress: bool = True,
    on_chunk: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Critique, revise, judge and write CAI pairs for ``records`` (stage-1 training records:
    id, instruction, type), resuming whatever ``out_dir`` holds.

    ``policy``: {"name": "base" | "sft" | "dpo", "adapter": path or None, "adapter_sha256":
    ...}; the named adapter must already be attached to ``lm`` (default: the base policy).
    Returns the counts over the whole output (resumed part included), resume info and
    timings."""
    policy = dict(policy or {"name": "base"})
    if policy.get("name") not in ("base", "sft", "dpo"):
        raise ValueError(f"policy name must be base, sft or dpo, got {policy.get('name')!r}")
    adapter = policy.get("adapter")
    policy = {
        "name": policy["name"],
        "adapter": None if adapter is None else str(adapter),
        "adapter_sha256": policy.get("adapter_sha256"),
    }
    _check_shots(cfg.n_shots, constitution)
    _check_shots(cfg.n_shots_judge, constitution)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    r_path, p_path = out_dir / "records.jsonl", out_dir / "pairs.jsonl"
    if cfg.max_instructions is not None:
        records = list(records)[: cfg.max_instructions]
    prompt_id = cai_prompt_id(constitution, cfg)
    state = resume_outputs(out_dir, prompt_id, policy)
    done_ids = {r["id"] for r in state["records"]}
    timings: dict[str, float] = {f"{s}_s": 0.0 for s in STEPS} | {"judge_s": 0.0}
    pending = [r for r in records if r["id"] not in done_ids]
    with JsonlAppender(r_path) as rw, JsonlAppender(p_path) as pw:
        pw.write_many(state["missing_pairs"])  # a kill between the two writes
        step = cfg.instructions_per_chunk
        for start in range(0, len(pending), step):
            chunk = pending[start : start + step]
            for rec in process_chunk(
                lm, chunk, cfg, constitution, policy, prompt_id, progress, timings
            ):
                rw.write(rec)  # the record first: it is what resume trusts
                pair = pair_record(rec)
                if pair is not None:
                    pw.write(pair)
            if on_chunk is not None:
                on_chunk(start + len(chunk), len(pending))
    return {
        "counts": summarize_records(read_jsonl(r_path)),
        "prompt_id": prompt_id,
        "resume": {
            "instructions_already_done": len(done_ids),
            "instructions_new": len(pending),
            "torn_lines_repaired": state["torn_lines_repaired"],
            "pairs_rebuilt_from_records": len(state["missing_pairs"]),
        },
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }
