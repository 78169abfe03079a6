"""Audit of the loss mask a trainer will actually use, run before the first optimizer step.

SFT and DPO only teach the right thing if (a) the token ids are the ones the model sees at
inference (one BOS where the model wants one, the prompt encoded by the loader's one encode path,
the completion tokens after it) and (b) the loss covers exactly the response and its EOS. Both
have failed silently before: a response template tokenised differently in context left every
label at -100 (trl #598/#980), and a prompt ending in ":" merges with a completion starting "\\n"
into one ":\\n" token in Qwen's tokenizer, so the first "response" token is partly prompt.

The audit takes the rows from the trainer's own preprocessed dataset (``trainer.train_dataset``),
recomputes the inference-path tokens independently and checks, for EVERY example:

- not fully masked (at least one trained label);
- no prompt position is trained;
- the first response token is trained;
- the last token is the model's EOS (``policy.eos_token_id``) and it is trained;
- every completion position is trained with label == input id;
- the ids equal ``encode(prompt) + tokens(completion) + [EOS]`` (so exactly one BOS for Gemma,
  none for Qwen, and no token straddling the prompt/completion boundary);
- no chat-control token anywhere but the final EOS.

The first failure raises ``MaskAuditError`` naming the example id. The first N examples are
rendered for a human with the trained spans marked ⟦...⟧ (``mask_audit.txt``) and stored with
per-token detail in ``mask_audit.json`` next to the run.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.clean_model_loader import ContaminationError, TokenPolicy, check_token_ids, encode_text
from utils.errors import GateError
from utils.jsonl_io import write_json_atomic

IGNORE_INDEX = -100
TRAINED_OPEN, TRAINED_CLOSE = "⟦", "⟧"


class MaskAuditError(GateError, ValueError):
    """The loss mask or the token ids of one example are wrong; the message names the example."""

    def __init__(self, example_id: Any, problem: str):
        self.example_id = example_id
        self.problem = problem
        super().__init__(f"mask audit failed for example {example_id!r}: {problem}")


@dataclass
class TokenRow:
    """One training sequence as the trainer will see it."""

    id: Any
    prompt: str
    completion: str  # without the EOS string
    input_ids: list[int]
    labels: list[int]


@dataclass
class MaskAudit:
    n_checked: int
    n_prompt_tokens: int
    n_trained_tokens: int
    examples: list[dict[str, Any]] = field(default_factory=list)  # the rendered first N
    text: str = ""

    def summary(self) -> dict[str, Any]:
        return {
            "passed": True,
            "n_checked": self.n_checked,
            "n_rendered": len(self.examples),
            "n_prompt_tokens": self.n_prompt_tokens,
            "n_trained_tokens": self.n_trained_tokens,
        }


def strip_eos(text: str, eos_token: str) -> str:
    """TRL appends the EOS string to each completion; the audit re-derives it from the policy."""
    return text[: -len(eos_token)] if eos_token and text.endswith(eos_token) else text


def expected_tokens(
    tokenizer: Any, policy: TokenPolicy, prompt: str, completion: str
) -> tuple[list[int], int]:
    """(ids, n_prompt_tokens) of the inference path: the loader's encode(prompt), then the
    completion's own tokens, then the EOS id that generation stops on."""
    prompt_ids = encode_text(tokenizer, policy, prompt)
    completion_ids = tokenizer(completion, add_special_tokens=False).input_ids
    return [*prompt_ids, *completion_ids, policy.eos_token_id], len(prompt_ids)


def _tok(tokenizer: Any, token_id: int) -> str:
    return repr(tokenizer.decode([token_id]))


def check_row(row: TokenRow, tokenizer: Any, policy: TokenPolicy) -> dict[str, Any]:
    """Check one row; raise ``MaskAuditError`` on the first problem, else return its facts."""
    ids, labels, rid = list(row.input_ids), list(row.labels), row.id
    if len(ids) != len(labels):
        raise MaskAuditError(rid, f"{len(ids)} input ids but {len(labels)} labels")
    if not ids:
        raise MaskAuditError(rid, "empty token sequence")
    trained = [lab != IGNORE_INDEX for lab in labels]
    if not any(trained):
        raise MaskAuditError(
            rid, "fully masked: every label is -100, so the example trains nothing"
        )
    if policy.add_bos:
        n_bos = ids.count(policy.bos_token_id)
        if ids[0] != policy.bos_token_id or n_bos != 1:
            raise MaskAuditError(
                rid, f"expected exactly one BOS at position 0, found {n_bos} (first id {ids[0]})"
            )
    elif tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id:
        raise MaskAuditError(rid, "starts with a BOS this model does not use")
    want, n_prompt = expected_tokens(tokenizer, policy, row.prompt, row.completion)
    if n_prompt >= len(ids):
        raise MaskAuditError(rid, f"sequence ({len(ids)} tokens) has no room after the prompt")
    for pos in range(n_prompt):
        if trained[pos]:
            raise MaskAuditError(
                rid,
                f"prompt token {pos} {_tok(tokenizer, ids[pos])} is trained (the prompt has "
                f"{n_prompt} tokens on the inference path"
                + (
                    "; the prompt's last token merged with the completion's first across the "
                    "boundary, so the trained sequence differs from what inference feeds)"
                    if pos == n_prompt - 1 and ids[pos] != want[pos]
                    else ")"
                ),
            )
    if not trained[n_prompt]:
        raise MaskAuditError(
            rid,
            f"first response token {n_prompt} {_tok(tokenizer, ids[n_prompt])} is not trained",
        )
    if ids[-1] != policy.eos_token_id:
        raise MaskAuditError(
            rid,
            f"last token is {_tok(tokenizer, ids[-1])} (id {ids[-1]}), not the EOS "
            f"{policy.eos_token!r} (id {policy.eos_token_id}): the model would never learn to "
            "stop (a completion cut by max_length loses its EOS)",
        )
    if not trained[-1]:
        raise MaskAuditError(rid, "the final EOS is not trained")
    for pos in range(n_prompt, len(ids)):
        if labels[pos] != ids[pos]:
            raise MaskAuditError(
                rid,
                f"completion position {pos} {_tok(tokenizer, ids[pos])} has label {labels[pos]}, "
                f"expected its own id {ids[pos]}",
            )
    if ids != want:
        diff = next(
            (i for i, (a, b) in enumerate(zip(ids, want, strict=False)) if a != b),
            min(len(ids), len(want)),
        )
        got_t = _tok(tokenizer, ids[diff]) if diff < len(ids) else "<end>"
        want_t = _tok(tokenizer, want[diff]) if diff < len(want) else "<end>"
        raise MaskAuditError(
            rid,
            f"token ids differ from the inference path encode(prompt) + completion + EOS at "
            f"position {diff}: trainer has {got_t}, inference has {want_t} "
            f"({len(ids)} vs {len(want)} tokens)",
        )
    try:
        check_token_ids(policy, ids[:-1], where="training sequence")
    except ContaminationError as e:
        raise MaskAuditError(rid, str(e)) from e
    return {
        "id": rid,
        "n_tokens": len(ids),
        "n_prompt_tokens": n_prompt,
        "n_trained": sum(trained),
        "first_trained_position": trained.index(True),
        "first_trained_token": tokenizer.decode([ids[n_prompt]]),
        "eos_trained": True,
    }


def render_row(row: TokenRow, tokenizer: Any) -> str:
    """The sequence as text with every trained span wrapped in ⟦...⟧ (runs decoded whole, so
    multi-byte characters split over tokens render correctly)."""
    out, run, run_trained = [], [], None
    for tid, lab in zip(row.input_ids, row.labels, strict=True):
        t = lab != IGNORE_INDEX
        if run and t != run_trained:
            text = tokenizer.decode(run)
            out.append(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if run_trained else text)
            run = []
        run.append(tid)
        run_trained = t
    if run:
        text = tokenizer.decode(run)
        out.append(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if run_trained else text)
    return "".join(out)


def audit_rows(
    rows: Iterable[TokenRow],
    tokenizer: Any,
    policy: TokenPolicy,
    n_render: int = 8,
    expected_ids: Sequence[Any] | None = None,
    title: str = "",
) -> MaskAudit:
    """Check every row (raise on the first failure) and render the first ``n_render``.

    ``expected_ids``: the example ids handed to the trainer; one the trainer's dataset lacks was
    silently dropped (TRL drops fully-masked examples after truncation) and is an error."""
    rows = list(rows)
    if expected_ids is not None:
        have = {r.id for r in rows}
        missing = [i for i in expected_ids if i not in have]
        if missing:
            raise MaskAuditError(
                missing[0],
                f"dropped by the trainer's preprocessing ({len(missing)} example(s) missing: "
                f"{missing[:5]}); its prompt probably fills max_length",
            )
    n_prompt = n_trained = 0
    rendered: list[dict[str, Any]] = []
    blocks = [
        f"# mask audit{': ' + title if title else ''}",
        f"# trained spans: {TRAINED_OPEN}...{TRAINED_CLOSE}",
    ]
    for i, row in enumerate(rows):
        facts = check_row(row, tokenizer, policy)
        n_prompt += facts["n_prompt_tokens"]
        n_trained += facts["n_trained"]
        if i < n_render:
            facts["tokens"] = [
                [tokenizer.convert_ids_to_tokens(int(t)), int(t), lab != IGNORE_INDEX]
                for t, lab in zip(row.input_ids, row.labels, strict=True)
            ]
            facts["rendered"] = render_row(row, tokenizer)
            rendered.append(facts)
            blocks.append(
                f"\n## example {row.id!r}: {facts['n_tokens']} tokens, "
                f"{facts['n_prompt_tokens']} prompt, {facts['n_trained']} trained\n"
                f"{facts['rendered']}"
            )
    if not rows:
        raise MaskAuditError("<none>", "the dataset is empty")
    blocks.append(
        f"\n# checked {len(rows)} example(s): every check passed "
        f"({n_trained} trained tokens, {n_prompt} prompt tokens masked)"
    )
    return MaskAudit(
        n_checked=len(rows),
        n_prompt_tokens=n_prompt,
        n_trained_tokens=n_trained,
        examples=rendered,
        text="\n".join(blocks) + "\n",
    )


# -- adapters from the trainers' preprocessed datasets --------------------------------------
def sft_rows(dataset: Any, eos_token: str) -> list[TokenRow]:
    """Rows of an SFTTrainer's preprocessed dataset (columns id, prompt, completion with the EOS
    string TRL appended, input_ids, labels)."""
    need = {"id", "prompt", "completion", "input_ids", "labels"}
    missing = need - set(dataset.column_names)
    if missing:
        raise ValueError(
            f"SFT dataset lacks columns {sorted(missing)}; the audit needs TRL's preprocessed "
            "prompt/completion dataset with the record ids kept"
        )
    return [
        TokenRow(
            id=r["id"],
            prompt=r["prompt"],
            completion=strip_eos(r["completion"], eos_token),
            input_ids=list(r["input_ids"]),
            labels=list(r["labels"]),
        )
        for r in dataset
    ]


def dpo_rows(dataset: Any, eos_token: str, max_length: int | None = None) -> list[TokenRow]:
    """Two rows per preference pair (chosen, rejected) exactly as TRL's DataCollatorForPreference
    builds them: prompt_ids + completion ids, prompt masked, cut at max_length (keep_start)."""
    need = {"id", "prompt", "chosen", "rejected", "prompt_ids", "chosen_ids", "rejected_ids"}
    missing = need - set(dataset.column_names)
    if missing:
        raise ValueError(f"DPO dataset lacks columns {sorted(missing)}")
    rows = []
    for r in dataset:
        p = list(r["prompt_ids"])
        for side in ("chosen", "rejected"):
            c = list(r[f"{side}_ids"])
            ids, labels = p + c, [IGNORE_INDEX] * len(p) + c
            if max_length is not None:
                ids, labels = ids[:max_length], labels[:max_length]
            rows.append(
                TokenRow(
                    id=f"{r['id']}:{side}",
                    prompt=r["prompt"],
                    completion=strip_eos(r[side], eos_token),
                    input_ids=ids,
                    labels=labels,
                )
            )
    return rows


def write_mask_audit(
    out_dir: str | Path,
    audits: dict[str, MaskAudit],
    policy: TokenPolicy,
    extra: dict | None = None,
) -> dict[str, Any]:
    """``mask_audit.json`` (summary + per-token detail of the rendered examples) and the human
    ``mask_audit.txt``; returns the summary for the manifest."""
    out_dir = Path(out_dir)
    summary = {
        "passed": True,
        "add_bos": policy.add_bos,
        "bos_token_id": policy.bos_token_id,
        "eos_token": policy.eos_token,
        "eos_token_id": policy.eos_token_id,
        "splits": {name: a.summary() for name, a in audits.items()},
        **(extra or {}),
    }
    write_json_atomic(
        out_dir / "mask_audit.json",
        {**summary, "examples": {name: a.examples for name, a in audits.items()}},
    )
    text = "\n".join(f"=== {name} ===\n{a.text}" for name, a in audits.items())
    tmp = out_dir / "mask_audit.txt.tmp"
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out_dir / "mask_audit.txt")
    return summary


def write_failed_audit(out_dir: str | Path, error: MaskAuditError) -> None:
    """Keep the failure with the run, so a stopped run says why."""
    write_json_atomic(
        Path(out_dir) / "mask_audit.json",
        {"passed": False, "example_id": error.example_id, "error": str(error)},
    )
