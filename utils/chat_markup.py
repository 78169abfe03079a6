"""The chat markup of every known chat family, as TEXT: one list, used everywhere.

A base model's tokenizer guards only its OWN control tokens (``LoadedModel.encode`` refuses
them). Another family's markup is plain text to it: with Gemma as the base, a response holding
``<|im_end|>\\n<|im_start|>assistant`` tokenises into ordinary pieces, trains, and teaches the
model ChatML turns. So text that goes into training is scanned for the markup of every family
here, whichever model is loaded.

Users:

* ``utils.contamination`` (the sentinel suite): ``CHAT_FORMATS`` probe each format with the
  family's ``markers`` (the same tuple objects) and ``END_OF_TURN_TOKENS`` (re-exported by
  ``utils.clean_model_loader``) is the union of the families' ``end_of_turn``.
* ``utils.sft.load_stage1`` and ``utils.dpo.load_pairs`` (SFT data, DPO and CAI pairs):
  ``scan_records_for_chat_markup`` refuses a record naming file, record and field.
* ``utils.completion_prompts.find_chat_markup`` (instruction pools, parsed completions,
  constitution texts): the same list plus the ``LOOSE_MARKUP`` fragments.

``END_OF_TURN_TOKENS`` is what the sentinels' end-of-turn probes and the loader's instruct-EOS
check look for; it is kept exactly as calibrated (docs/sentinel_calibration.md). Giving a
family another end-of-turn token changes verdicts: bump ``contamination.SUITE_VERSION``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.jsonl_io import JsonlError


@dataclass(frozen=True)
class ChatFamily:
    """One chat format's turn markup as it appears in text."""

    name: str
    markers: tuple[str, ...]  # every marker of the format's turns
    end_of_turn: tuple[str, ...] = ()  # the markers among them that close a turn


CHAT_FAMILIES: tuple[ChatFamily, ...] = (
    ChatFamily("chatml", ("<|im_start|>", "<|im_end|>"), ("<|im_end|>",)),  # Qwen, SmolLM
    ChatFamily("gemma", ("<start_of_turn>", "<end_of_turn>"), ("<end_of_turn>",)),
    ChatFamily(
        "llama3", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), ("<|eot_id|>",)
    ),
    ChatFamily("llama4", ("<|header_start|>", "<|header_end|>", "<|eot|>"), ("<|eot|>",)),
    ChatFamily("llama2-mistral", ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")),
    ChatFamily("mistral-v7", ("[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[AVAILABLE_TOOLS]")),
    # Phi-3 ends turns with <|end|>; Zephyr uses the same role tags and ends with </s>.
    ChatFamily("phi-zephyr", ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), ("<|end|>",)),
    ChatFamily("openchat", ("<|end_of_turn|>",), ("<|end_of_turn|>",)),
    ChatFamily(
        "nanochat",
        ("<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>"),
        ("<|assistant_end|>",),
    ),
    ChatFamily(
        "command-r",
        ("<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>"),
    ),
    ChatFamily("granite", ("<|start_of_role|>", "<|end_of_role|>")),
    ChatFamily("harmony", ("<|start|>", "<|message|>", "<|channel|>", "<|return|>")),
    ChatFamily("deepseek", ("<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>")),
)
FAMILIES: dict[str, ChatFamily] = {f.name: f for f in CHAT_FAMILIES}
# Every family's markers, longest first so an overlap is reported by its full marker.
CHAT_MARKERS: tuple[str, ...] = tuple(
    sorted({m for f in CHAT_FAMILIES for m in f.markers}, key=lambda m: (-len(m), m))
)
END_OF_TURN_TOKENS: frozenset[str] = frozenset(t for f in CHAT_FAMILIES for t in f.end_of_turn)
# A special token's shape in text ("<|endoftext|>", "<|im_sep|>", DeepSeek's full-width bars):
# catches families not listed above. Elixir/F# pipes ("x |> f") do not match.
SPECIAL_TOKEN_SHAPE = re.compile(r"<[|｜][^\s|｜<>]{1,48}[|｜]>")
# Fragments too common in ordinary text to refuse training data for ("|>" is a pipe in code,
# "<s>" an HTML tag), but refused where text must be plain prose: instruction pools, parsed
# instructions, constitution texts (``find_chat_markup(text, loose=True)``).
LOOSE_MARKUP: tuple[str, ...] = ("<|", "|>", "<s>", "</s>", "<bos>", "<eos>")

_FAMILY_OF = {m: f.name for f in reversed(CHAT_FAMILIES) for m in f.markers}


@dataclass(frozen=True)
class MarkupHit:
    marker: str  # the text found
    family: str  # a family name, "special-token shape" or "loose"
    offset: int  # character offset of its first occurrence


def locate_chat_markup(text: str, loose: bool = False) -> MarkupHit | None:
    """The earliest chat marker in ``text`` (a family marker, else a special-token shape,
    else with ``loose`` a loose fragment), or None."""
    hits = [(text.find(m), -len(m), m) for m in CHAT_MARKERS if m in text]
    if hits:
        offset, _, marker = min(hits)
        return MarkupHit(marker, _FAMILY_OF[marker], offset)
    shape = SPECIAL_TOKEN_SHAPE.search(text)
    if shape:
        return MarkupHit(shape.group(0), "special-token shape", shape.start())
    if loose:
        found = [(text.find(m), m) for m in LOOSE_MARKUP if m in text]
        if found:
            offset, marker = min(found)
            return MarkupHit(marker, "loose", offset)
    return None


def find_chat_markup(text: str, loose: bool = False) -> str | None:
    """The earliest chat marker in ``text`` (see ``locate_chat_markup``), or None."""
    hit = locate_chat_markup(text, loose)
    return hit.marker if hit else None


def scan_records_for_chat_markup(
    records: Sequence[Mapping[str, Any]],
    path: str | Path,
    fields: Sequence[str],
    lines: Sequence[int] | None = None,
) -> None:
    """Raise ``JsonlError`` (file, line, field) at the first record whose text ``fields`` hold
    chat markup of any family. ``lines``: each record's line (``read_jsonl_numbered``); without
    it the record number is taken as the line (true of the files this project writes, which
    have no blank lines). Fields that are missing or not strings are left to the caller."""
    for n, record in enumerate(records, start=1):
        line = lines[n - 1] if lines is not None else n
        for field in fields:
            value = record.get(field)
            if not isinstance(value, str):
                continue
            hit = locate_chat_markup(value)
            if hit:
                rid = f" (id {record['id']!r})" if "id" in record else ""
                raise JsonlError(
                    path,
                    line,
                    f"record {n}{rid} contains {hit.family} chat markup {hit.marker!r} at "
                    f"character {hit.offset}; training on it would teach that chat format's "
                    "turns (drop the record, or fix the stage that wrote it)",
                    field,
                )
