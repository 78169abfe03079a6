"""Sentinel suite: does this model behave like, or carry the weights of, a chat model?

Three kinds of evidence, one verdict (clean / suspicious / contaminated; "error" when a check
is itself broken):

1. **Static sentinels** on the real encode path: no chat template (and ``apply_chat_template``
   raises), no chat-control token id in the ids of the actual sentinel prompts encoded through
   ``lm.encode``, a canary proving that this id check DOES fire on an input with a control id
   inserted (the old system's check re-encoded plain text and could never fire), exactly the
   model's BOS policy, EOS among the inference stop ids, and no instruct signal in the
   loader's provenance.
2. **Behavioural sentinels**: plain instructions ("Translate to Pig Latin: hello world", ...)
   prompted raw (or through a chat template for positive controls), greedy and sampled; each
   output is judged by code that checks what following the instruction means (the Pig Latin
   translation appears, exactly three primes and then a stop, a JSON object with integer a
   and b, ...). A base model continues text; an instruct model answers and stops.
3. **Weight probe**: at 135M parameters an instruct model prompted raw rambles like a base
   model, so raw behaviour alone cannot tell the weights apart. What instruct tuning leaves in
   the weights is the turn structure: after a complete answer in a chat format the model puts
   high probability on that format's end-of-turn token (SmolLM2-135M-Instruct: ~0.6 after
   "<|im_start|>assistant\\n...Paris."), and none after an unfinished answer. A base model
   whose vocabulary has those tokens never trained them (Gemma-3-270M base: P(<end_of_turn>)
   ~1e-10). Probed in every common chat format whose tokens are in the vocabulary (derived
   from the tokenizer) plus a plain "User:/Assistant:" format, regardless of the model's name,
   template or config, so renamed instruct weights are caught.

Thresholds live in ``THRESHOLDS`` (one place, each justified by the calibration on the real
controls, see docs/sentinel_calibration.md). ``run_sentinel_suite(lm, config)`` is what stages
call; ``run_calibration`` reruns the positive/negative controls for the report and tests.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from utils.chat_markup import FAMILIES as CHAT_FAMILIES
from utils.clean_model_loader import END_OF_TURN_TOKENS, ContaminationError, LoadedModel
from utils.errors import EXIT_GATE, EXIT_OK

VERDICTS = ("clean", "suspicious", "contaminated", "error")  # in increasing severity
# Bumped when a verdict for the same model and config can change; cached verdicts keyed on it.
# 2: trained arms are judged on chat-only end tokens, behaviour informational (KNOWN_BUGS #18).
SUITE_VERSION = 2
# static: the token/template checks, no forward pass. probe: + the weight probe (one batch of
# next-token probabilities, ~2 s on Gemma-3-270M CPU): the cheapest check that sees instruct
# WEIGHTS, so every shipped preset runs at least this (issue 14). quick: + greedy behaviour
# (~13 s more). full: + sampled behaviour (calibration).
MODES = ("static", "probe", "quick", "full")
# A recipe may also say off (YAML reads a bare `off` as false): the stages then record that no
# sentinel ran (run_context.run_configured_sentinels); the suite itself never runs "off".
OFF = "off"
PROMPT_FORMATS = ("raw", "chat-template")


# ------------------------------------------------------------------------ thresholds
@dataclass(frozen=True)
class Thresholds:
    """Every decision boundary of the suite, in one place.

    Calibrated on the real controls (docs/sentinel_calibration.md), CPU fp32:
    - ``follow_*``: share of (sentinel, sample) pairs followed within one decoding mode. The
      Gemma-3-270M base model follows 0 of 6 raw sentinels greedy and sampled; one accidental
      follow (1/6 = 0.17, e.g. a base model continuing with '{"a": 1, "b": 2}') must not flag a
      base model, two of six (0.33) is unusual for a base model (suspicious), half (0.5) is
      what an instruction follower does (contaminated).
    - ``eot_*``: the weight probe's score, mean P(end-of-turn | complete answer) minus mean
      P(end-of-turn | unfinished answer), best chat format. SmolLM2-135M-Instruct scores ~0.6
      (ChatML) and ~0.4 (plain User/Assistant); Gemma-3-270M base ~0.001 in both its formats
      (that is P(<eos>); its untrained <end_of_turn> gets ~1e-10). 0.10 is 4x below the
      weakest instruct format and 100x above the base model; 0.02 (20x above the base) marks
      a model worth a look.
    - ``stop_*``: share of greedy chat-format probe questions answered and closed with an
      end-of-turn/EOS within the token budget. The instruct control closes most; a base model
      continues the dialogue or rambles (0 of 6 for Gemma base). One closed answer in 3+ can be
      chance (a base model that hit a document end), half is turn-taking behaviour.
    """

    follow_suspicious: float = 0.30
    follow_contaminated: float = 0.50
    eot_suspicious: float = 0.02
    eot_contaminated: float = 0.10
    stop_suspicious: float = 0.34
    stop_contaminated: float = 0.50


THRESHOLDS = Thresholds()


def level(value: float, suspicious: float, contaminated: float) -> str:
    """'contaminated' at or above ``contaminated``, 'suspicious' at or above ``suspicious``."""
    if value >= contaminated:
        return "contaminated"
    if value >= suspicious:
        return "suspicious"
    return "clean"


def worst(verdicts: Sequence[str]) -> str:
    """The most severe verdict of ``verdicts`` (clean < suspicious < contaminated < error)."""
    if not verdicts:
        return "clean"
    unknown = [v for v in verdicts if v not in VERDICTS]
    if unknown:
        raise ValueError(f"unknown verdict(s) {unknown}; known: {VERDICTS}")
    return max(verdicts, key=VERDICTS.index)


# --------------------------------------------------------------------------- scorers
@dataclass(frozen=True)
class Judgement:
    followed: bool
    reason: str


_PUNCT_EDGES = " \t\r\n.,!?;:\"'`*_()[]"


def score_pig_latin(text: str, stopped: bool = True) -> Judgement:
    """Followed when the translation of "hello world", "ellohay orldway", appears (any case,
    hyphenated "ello-hay orld-way" or not). A correct translation is instruction following,
    never "base behaviour" (the old system scored it as base behaviour)."""
    norm = re.sub(r"[-'’*_]", "", text.lower())
    if re.search(r"\bellohay\W+orldway\b", norm):
        return Judgement(True, "contains the Pig Latin translation 'ellohay orldway'")
    if "ellohay" in norm or "orldway" in norm:
        return Judgement(False, "only half of the translation")
    return Judgement(False, "no Pig Latin translation of 'hello world'")


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


# A list enumerator at the start of a line ("1. ", "2) ", "- "), followed by content on the line.
_ENUMERATOR = re.compile(r"^[ \t]*(?:\d+[.)]|[-*•])[ \t]+(?=\S)", re.MULTILINE)


def score_three_primes(text: str, stopped: bool = True) -> Judgement:
    """Followed when the answer lists exactly three distinct primes and then stops (EOS or
    end-of-turn); list enumerators ("1. 2") are not counted as numbers."""
    numbers = [int(n) for n in re.findall(r"(?<![\d.])\d+(?![\d])", _ENUMERATOR.sub("", text))]
    if len(numbers) != 3:
        return Judgement(False, f"{len(numbers)} numbers, not 3: {numbers[:8]}")
    if len(set(numbers)) != 3:
        return Judgement(False, f"repeated numbers: {numbers}")
    not_prime = [n for n in numbers if not is_prime(n)]
    if not_prime:
        return Judgement(False, f"not prime: {not_prime}")
    if not stopped:
        return Judgement(False, f"three primes {numbers} but did not stop")
    return Judgement(True, f"exactly three primes {numbers}, then stopped")


def _first_json_object(text: str) -> tuple[dict[str, Any] | None, str]:
    decoder = json.JSONDecoder()
    errors = []
    for m in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, m.start())
        except json.JSONDecodeError as e:
            errors.append(str(e))
            continue
        if isinstance(obj, dict):
            return obj, ""
    return None, errors[0] if errors else "no '{' in the output"


def score_json_ab(text: str, stopped: bool = True) -> Judgement:
    """Followed when the output holds a parsable JSON object whose keys are exactly a and b,
    both integers (code fences allowed; booleans and floats are not integers)."""
    obj, err = _first_json_object(text)
    if obj is None:
        return Judgement(False, f"no parsable JSON object ({err})")
    if set(obj) != {"a", "b"}:
        return Judgement(False, f"keys {sorted(obj)} are not exactly a, b")
    bad = {k: v for k, v in obj.items() if isinstance(v, bool) or not isinstance(v, int)}
    if bad:
        return Judgement(False, f"not integers: {bad}")
    return Judgement(True, f"JSON object {obj}")


_SEASONS = {
    "spring": r"\bspring\b",
    "summer": r"\bsummer\b",
    "autumn": r"\b(?:autumn|fall)\b",
    "winter": r"\bwinter\b",
}


def _repeated_line(text: str) -> str | None:
    """A non-trivial line that occurs twice: the signature of a looping continuation."""
    seen: set[str] = set()
    for line in text.splitlines():
        key = line.strip().lower()
        if len(key) < 4:
            continue
        if key in seen:
            return line.strip()
        seen.add(key)
    return None


def score_seasons(text: str, stopped: bool = True) -> Judgement:
    """Followed when the answer names all four seasons and is closed (stopped, or a structured
    list of at least four items) without looping. A rambling continuation repeats lines, names
    fewer seasons, or runs on unstructured."""
    low = text.lower()
    missing = [s for s, pat in _SEASONS.items() if not re.search(pat, low)]
    if missing:
        return Judgement(False, f"does not name {missing}")
    rep = _repeated_line(text)
    if rep is not None:
        return Judgement(False, f"repeats the line {rep[:40]!r}")
    items = len(_ENUMERATOR.findall(text)) + len(re.findall(r"^\s*\w+\s*:", text, re.MULTILINE))
    if stopped:
        return Judgement(True, "names the four seasons and stops")
    if items >= 4:
        return Judgement(True, f"names the four seasons in a structured list ({items} items)")
    return Judgement(False, "names the four seasons but runs on unstructured")


_YES_NO = re.compile(r"^(?:(?:the )?answer(?: is)?\s*:?\s*)?(yes|no)$")


def score_yes_no(text: str, stopped: bool = True) -> Judgement:
    """Followed when the whole answer is "yes" or "no" (optionally "The answer is: no") and the
    model stopped; "Yes, the sky is blue because ..." did not answer with yes or no."""
    norm = " ".join(text.strip(_PUNCT_EDGES).lower().split())
    m = _YES_NO.match(norm)
    if m is None:
        return Judgement(False, f"not a bare yes/no: {text.strip()[:40]!r}")
    if not stopped:
        return Judgement(False, f"said {m.group(1)!r} but did not stop")
    return Judgement(True, f"answered {m.group(1)!r} and stopped")


def score_all_caps(text: str, stopped: bool = True) -> Judgement:
    """Followed when the answer has at least 3 letters, every cased letter is upper case, and
    the model stopped (a looping "GREEN GREEN ..." to the token limit is not a response)."""
    letters = [c for c in text if c.isalpha()]
    if len(letters) < 3:
        return Judgement(False, f"{len(letters)} letters, too short to judge")
    lower = [c for c in letters if c.islower()]
    if lower:
        return Judgement(False, f"{len(lower)} of {len(letters)} letters are lower case")
    if not stopped:
        return Judgement(False, "all capitals but did not stop")
    return Judgement(True, "all capitals, then stopped")


@dataclass(frozen=True)
class Sentinel:
    name: str
    instruction: str
    scorer: Callable[[str, bool], Judgement]


SENTINELS: tuple[Sentinel, ...] = (
    Sentinel("pig_latin", "Translate to Pig Latin: hello world", score_pig_latin),
    Sentinel("three_primes", "List three prime numbers", score_three_primes),
    Sentinel("json_ab", "Write a JSON with keys a,b and integers", score_json_ab),
    Sentinel("seasons", "Describe the seasons", score_seasons),
    Sentinel("yes_no", "Answer with yes or no: Is the sky blue?", score_yes_no),
    Sentinel("all_caps", "Respond in all capitals: What color is grass?", score_all_caps),
)


def raw_prompt(instruction: str) -> str:
    """The instruction as a line of plain text; the model writes on the next line. This is the
    most answer-inviting plain prompt (an instruct model gets its best chance to answer), and
    carries no format a base model could have learned to follow."""
    return instruction + "\n"


# ------------------------------------------------------------------------ chat formats
def apply_template(template: str, text: str) -> str:
    """``template`` with ``{prompt}`` replaced by ``text`` (plain replace, not str.format, so a
    template may contain other braces)."""
    return template.replace("{prompt}", text)


@dataclass(frozen=True)
class ChatFormat:
    name: str
    user_turn: str  # with {prompt}; ends where the assistant's answer starts
    answer_prefix: str  # put before a probe answer ("" or " ")
    markup_tokens: tuple[str, ...]  # must each be ONE token in the vocabulary to probe this
    # (the family's markers in utils/chat_markup.py, the one list the data scans use too)

    def prompt(self, text: str) -> str:
        return apply_template(self.user_turn, text)


CHAT_FORMATS: tuple[ChatFormat, ...] = (
    ChatFormat(
        "chatml",
        "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
        "",
        CHAT_FAMILIES["chatml"].markers,
    ),
    ChatFormat(
        "gemma",
        "<start_of_turn>user\n{prompt}<end_of_turn>\n<start_of_turn>model\n",
        "",
        CHAT_FAMILIES["gemma"].markers,
    ),
    ChatFormat(
        "llama3",
        "<|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "",
        CHAT_FAMILIES["llama3"].markers,
    ),
    ChatFormat("plain", "User: {prompt}\nAssistant:", " ", ()),
)

# The original SmolLM2-135M-Instruct template (system turn included), applied by hand for the
# positive control "instruct model prompted WITH its chat template".
SMOLLM2_CHAT_TEMPLATE = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
)
GEMMA_CHAT_TEMPLATE = "<start_of_turn>user\n{prompt}<end_of_turn>\n<start_of_turn>model\n"


def single_token(tokenizer: Any, text: str) -> int | None:
    """The id of ``text`` when the tokenizer encodes the string to exactly one token whose
    vocabulary entry IS that string; else None (convert_tokens_to_ids returns UNK for a missing
    token, which must not count as present)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) != 1 or tokenizer.convert_ids_to_tokens(ids[0]) != text:
        return None
    return int(ids[0])


def available_formats(tokenizer: Any) -> list[ChatFormat]:
    """The chat formats whose markup tokens all exist as single tokens in this vocabulary
    (plain "User:/Assistant:" always)."""
    return [
        f
        for f in CHAT_FORMATS
        if all(single_token(tokenizer, t) is not None for t in f.markup_tokens)
    ]


def end_token_ids(lm: LoadedModel) -> dict[str, int]:
    """Every token that closes a turn or a document for this model: the known chat
    end-of-turn tokens present in the vocabulary, EOS and the inference stop ids."""
    tok = lm.tokenizer
    out: dict[str, int] = {}
    for s in sorted(END_OF_TURN_TOKENS):
        tid = single_token(tok, s)
        if tid is not None:
            out[s] = tid
    for tid in (lm.policy.eos_token_id, *lm.policy.stop_token_ids):
        out.setdefault(tok.convert_ids_to_tokens(int(tid)), int(tid))
    return out


# ------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class SentinelConfig:
    """What ``run_sentinel_suite`` runs. Defaults are the CPU defaults (2 cores)."""

    # off | static | probe (+ weight probe) | quick (+ greedy) | full (+ sampled); false/null: off
    mode: str | bool | None = "quick"
    prompt_format: str = "raw"  # raw | chat-template (positive controls)
    chat_template: str | None = None  # "{prompt}" template for chat-template; None: from vocab
    max_new_tokens: int = 40
    temperatures: tuple[float, ...] = (0.7, 1.0)  # sampled decoding, full mode
    samples_per_temperature: int = 1
    top_p: float = 0.95
    seed: int = 0
    batch_size: int = 32
    torch_threads: int | None = None  # None: leave torch's setting alone

    def __post_init__(self) -> None:
        if self.mode in (False, None):
            object.__setattr__(self, "mode", OFF)
        if self.mode is True or self.mode not in (OFF, *MODES):
            raise ValueError(f"sentinels.mode must be one of {(OFF, *MODES)}, got {self.mode!r}")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(
                f"sentinels.prompt_format must be one of {PROMPT_FORMATS}, got {self.prompt_format!r}"
            )
        if self.chat_template is not None and "{prompt}" not in self.chat_template:
            raise ValueError("sentinels.chat_template must contain '{prompt}'")
        for name in ("max_new_tokens", "batch_size", "samples_per_temperature"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"sentinels.{name} must be an integer >= 1, got {v!r}")
        if not self.temperatures or any(
            isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0
            for t in self.temperatures
        ):
            raise ValueError(
                f"sentinels.temperatures must be positive numbers, got {self.temperatures!r}"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sentinels.top_p must be in (0, 1], got {self.top_p!r}")
        if self.torch_threads is not None and (
            not isinstance(self.torch_threads, int) or self.torch_threads < 1
        ):
            raise ValueError(
                f"sentinels.torch_threads must be null or >= 1, got {self.torch_threads!r}"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> SentinelConfig:
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown sentinels key(s) {unknown}; known: {sorted(known)}")
        if "temperatures" in d:
            t = d["temperatures"]
            d["temperatures"] = tuple(t) if isinstance(t, (list, tuple)) else (t,)
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "temperatures": list(self.temperatures)}


def _as_config(config: SentinelConfig | Mapping[str, Any] | None) -> SentinelConfig:
    return config if isinstance(config, SentinelConfig) else SentinelConfig.from_dict(config)


def sentinel_prompts(lm: LoadedModel, config: SentinelConfig) -> list[str]:
    """The exact prompt strings the sentinels are fed in ``config.prompt_format``."""
    if config.prompt_format == "raw":
        return [raw_prompt(s.instruction) for s in SENTINELS]
    template = config.chat_template
    if template is None:  # the first real chat format this vocabulary supports
        fmt = next((f for f in available_formats(lm.tokenizer) if f.name != "plain"), None)
        template = (fmt or CHAT_FORMATS[-1]).user_turn
    return [apply_template(template, s.instruction) for s in SENTINELS]


# ---------------------------------------------------------------------- static checks
@dataclass
class Check:
    name: str
    passed: bool
    detail: str
    broken: bool = False  # the check itself cannot fire: the suite's verdict is "error"


def _control_id_for_canary(lm: LoadedModel) -> tuple[int, str] | None:
    policy = lm.policy
    markup = [t for f in CHAT_FORMATS for t in f.markup_tokens]
    # Real chat markup in the vocabulary first (<|im_start|>, <start_of_turn>), whether or not the
    # policy lists it: the canary is the realistic leak, and a policy blind to it is broken.
    for s in [*markup, *policy.control_token_strings]:
        tid = single_token(lm.tokenizer, s)
        if tid is not None and tid != policy.bos_token_id:  # NOT filtered by the policy's ids
            return tid, s
    return None


def static_checks(
    lm: LoadedModel, prompts: Sequence[str], allow_control_tokens: bool
) -> list[Check]:
    """Template, control ids on the real encode path (+ canary), BOS, EOS, instruct metadata."""
    tok, policy = lm.tokenizer, lm.policy
    checks: list[Check] = []

    template = getattr(tok, "chat_template", None)
    checks.append(
        Check(
            "chat_template_removed",
            not template,
            "tokenizer.chat_template is None"
            if not template
            else f"tokenizer has a chat template ({len(str(template))} chars)",
        )
    )
    try:
        out = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
        checks.append(Check("apply_chat_template_raises", False, f"it returned {str(out)[:60]!r}"))
    except Exception as e:  # any refusal counts; the loader's is ChatTemplateError
        checks.append(Check("apply_chat_template_raises", True, f"raised {type(e).__name__}"))

    # The ids of the actual sentinel prompts, through THE encode path, checked by the policy.
    encoded: list[list[int]] = []
    problems: list[str] = []
    for i, p in enumerate(prompts):
        try:
            ids = lm.encode(p, allow_control_tokens=allow_control_tokens)
        except ContaminationError as e:
            problems.append(f"prompt {i}: encode refused: {e}")
            continue
        encoded.append(ids)
        try:
            lm.check_ids(ids, where=f"prompt {i}")
        except ContaminationError as e:
            problems.append(str(e))
    checks.append(
        Check(
            "no_control_ids_in_inputs",
            not problems,
            f"{len(prompts)} sentinel prompts encoded, no chat-control id"
            if not problems
            else "; ".join(problems[:3])
            + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""),
        )
    )

    # Canary: the same check must fire on a clean input with one control id inserted, and the
    # encode path must refuse the control token's text. Otherwise the check above proves nothing.
    canary = _control_id_for_canary(lm)
    base_ids = lm.encode(raw_prompt(SENTINELS[0].instruction))
    poisoned: list[int] | None = None
    if canary is None:
        checks.append(
            Check(
                "canary_fires",
                False,
                "no control token to insert: the check can never fire",
                broken=True,
            )
        )
    else:
        tid, tstr = canary
        pos = 1 + len(base_ids) // 2
        poisoned = [*base_ids[:pos], tid, *base_ids[pos:]]
        fired_ids = fired_text = False
        try:
            lm.check_ids(poisoned, where="canary")
        except ContaminationError:
            fired_ids = True
        try:
            lm.encode(raw_prompt(SENTINELS[0].instruction) + tstr)
        except ContaminationError:
            fired_text = True
        ok = fired_ids and fired_text
        checks.append(
            Check(
                "canary_fires",
                ok,
                f"control id {tid} ({tstr}) inserted at position {pos}: id check "
                f"{'fired' if fired_ids else 'DID NOT fire'}; its text in a prompt: encode "
                f"{'refused' if fired_text else 'DID NOT refuse'}",
                broken=not ok,
            )
        )

    # BOS: the policy agrees with the tokenizer's own behaviour, and every input has exactly it.
    bos = tok.bos_token_id
    native = tok("a").input_ids
    tokenizer_adds = bos is not None and bool(native) and native[0] == bos
    bos_problems = []
    if policy.add_bos != tokenizer_adds:
        bos_problems.append(
            f"policy add_bos={policy.add_bos} but the tokenizer adds BOS: {tokenizer_adds}"
        )
    for i, ids in enumerate(encoded):
        n_bos = sum(1 for t in ids if bos is not None and t == bos)
        if policy.add_bos and (not ids or ids[0] != bos or n_bos != 1):
            bos_problems.append(
                f"prompt {i}: {n_bos} BOS, first id {ids[:1]}, expected exactly one at 0"
            )
        if not policy.add_bos and n_bos:
            bos_problems.append(f"prompt {i}: BOS id {bos} present in a model without BOS")
    cfg_bos = getattr(getattr(lm.model, "config", None), "bos_token_id", None)
    if policy.add_bos and isinstance(cfg_bos, int) and cfg_bos != policy.bos_token_id:
        bos_problems.append(f"model config bos {cfg_bos} != policy bos {policy.bos_token_id}")
    checks.append(
        Check(
            "bos_policy",
            not bos_problems,
            (f"exactly one BOS ({bos})" if policy.add_bos else "no BOS, as the tokenizer")
            if not bos_problems
            else "; ".join(bos_problems[:3]),
        )
    )

    checks.append(
        Check(
            "eos_is_stop_token",
            policy.eos_token_id in policy.stop_token_ids,
            f"eos {policy.eos_token_id} ({policy.eos_token}) in stop ids {list(policy.stop_token_ids)}",
        )
    )
    signals = list(lm.provenance.get("instruct_signals") or [])
    checks.append(
        Check(
            "no_instruct_metadata",
            not signals,
            "no instruct signal in name/EOS/config" if not signals else "; ".join(signals),
        )
    )
    return checks + vllm_path_checks(lm, encoded, poisoned)


def vllm_path_checks(
    lm: LoadedModel, encoded: Sequence[Sequence[int]], poisoned: Sequence[int] | None
) -> list[Check]:
    """With a vLLM engine attached (generation.backend: vllm), the id checks on what vLLM
    itself reports having consumed (``RequestOutput.prompt_token_ids``) for the sentinel prompts,
    and the canary through that path: vLLM's door (``engine_prompts``) refuses the poisoned ids,
    and the check fires on the ids vLLM consumed when they are pushed past the door. Nothing
    without an engine (HF generates: the checks above see its ids)."""
    from utils.generation import attached_engine
    from utils.vllm_scoring import engine_prompts, fed_prompt_ids

    engine = attached_engine(lm)
    if engine is None:
        return []
    fed = fed_prompt_ids(engine.llm, lm, encoded, allow_control_tokens=True)
    problems = []
    for i, (sent, got) in enumerate(zip(encoded, fed, strict=True)):
        if list(got) != list(sent):
            problems.append(f"prompt {i}: vLLM consumed {len(got)} ids, not the {len(sent)} sent")
        try:
            lm.check_ids(got, where=f"vLLM prompt {i}")
        except ContaminationError as e:
            problems.append(str(e))
    detail = f"{len(fed)} sentinel prompts as vLLM consumed them: the ids sent, no control id"
    checks = [Check("vllm_fed_ids", not problems, "; ".join(problems[:3]) or detail)]
    if poisoned is None:  # canary_fires is already broken: nothing to insert
        return checks
    refused = fired = False
    try:
        engine_prompts(lm, [poisoned])
    except ContaminationError:
        refused = True
    got = fed_prompt_ids(engine.llm, lm, [poisoned], allow_control_tokens=True)[0]
    try:
        lm.check_ids(got, where="vLLM canary")
    except ContaminationError:
        fired = True
    ok = refused and fired
    detail = (
        f"canary ids: vLLM's door {'refused' if refused else 'DID NOT refuse'} them; pushed "
        f"past it, the id check on what vLLM consumed {'fired' if fired else 'DID NOT fire'}"
    )
    checks.append(Check("vllm_canary_fires", ok, detail, broken=not ok))
    return checks


# --------------------------------------------------------------------------- weight probe
# Short questions with a complete answer, and an unfinished prefix of the same answer: an
# instruct model ends its turn after the first, never after the second.
PROBE_QA: tuple[tuple[str, str, str], ...] = (
    (
        "What is the capital of France?",
        "The capital of France is Paris.",
        "The capital of France is",
    ),
    ("What is 2 + 2?", "2 + 2 = 4.", "2 + 2 ="),
    ("Name a primary color.", "Red is a primary color.", "Red is a"),
    ("Say hello.", "Hello! How can I help you today?", "Hello! How can I"),
    ("Is water wet? Answer yes or no.", "Yes.", "Yes, water"),
    ("Give me a synonym for happy.", "A synonym for happy is joyful.", "A synonym for happy is"),
)
# Greedy generation probe: does the model answer and close the turn by itself?
PROBE_QUESTIONS: tuple[str, ...] = (
    "What is the capital of France?",
    "Name a primary color.",
    "What is 2 + 2?",
)


def eot_margin(p_complete: Sequence[float], p_unfinished: Sequence[float]) -> float:
    """mean P(end | complete answer) - mean P(end | unfinished answer), floored at 0: how much
    the model ends turns where answers end (a model that emits the token anywhere scores 0)."""
    if not p_complete or len(p_complete) != len(p_unfinished):
        raise ValueError("need equally many (>0) complete and unfinished probabilities")
    m = sum(p_complete) / len(p_complete) - sum(p_unfinished) / len(p_unfinished)
    return max(0.0, m)


def trained_stop_ids(lm: LoadedModel) -> set[int]:
    """The ids this project trains as the end of a response: EOS and the inference stop ids
    (SFT appends EOS to every completion, inside the loss)."""
    return {int(lm.policy.eos_token_id), *map(int, lm.policy.stop_token_ids)}


def weight_probe(
    lm: LoadedModel, batch_size: int = 32, exclude_trained_stops: bool = False
) -> dict[str, Any]:
    """P(any end token | answer so far) in every chat format the vocabulary supports.

    ``exclude_trained_stops`` (trained arms): only the chat end-of-turn tokens that are NOT the
    stop ids SFT trains (``trained_stop_ids``) count. An adapter that learned to end its answers
    with EOS, which is what stage-1 SFT teaches, then scores nothing for it; one that raises
    P(<end_of_turn>), a token no clean training record contains, still scores."""
    from utils.scoring import next_token_logprobs

    formats = available_formats(lm.tokenizer)
    ends = end_token_ids(lm)
    excluded: dict[str, int] = {}
    if exclude_trained_stops:
        stops = trained_stop_ids(lm)
        excluded = {t: i for t, i in ends.items() if i in stops}
        ends = {t: i for t, i in ends.items() if i not in stops}
    if not ends:
        return {
            "formats": [f.name for f in formats], "end_tokens": {}, "excluded_end_tokens": excluded,
            "per_format": {}, "score": 0.0, "best_format": None,
            "note": "no chat end-of-turn token outside the trained stop ids: nothing to probe",
        }  # fmt: skip
    cand = list(dict.fromkeys(ends.values()))
    prompts: list[str] = []
    for f in formats:
        for q, complete, unfinished in PROBE_QA:
            prompts.append(f.prompt(q) + f.answer_prefix + complete)
            prompts.append(f.prompt(q) + f.answer_prefix + unfinished)
    logp = next_token_logprobs(lm, prompts, cand, batch_size=batch_size, allow_control_tokens=True)
    p_end = logp.exp().sum(dim=1).tolist()  # P(any end token): the candidates are disjoint ids
    per_format: dict[str, Any] = {}
    k = 0
    for f in formats:
        pc, pu = [], []
        for _ in PROBE_QA:
            pc.append(p_end[k])
            pu.append(p_end[k + 1])
            k += 2
        per_format[f.name] = {
            "p_end_complete": [round(x, 6) for x in pc],
            "p_end_unfinished": [round(x, 6) for x in pu],
            "mean_p_end_complete": round(sum(pc) / len(pc), 6),
            "mean_p_end_unfinished": round(sum(pu) / len(pu), 6),
            "score": round(eot_margin(pc, pu), 6),
        }
    best = max(per_format, key=lambda n: per_format[n]["score"])
    return {
        "formats": [f.name for f in formats],
        "end_tokens": ends,
        "excluded_end_tokens": excluded,
        "per_format": per_format,
        "score": per_format[best]["score"],
        "best_format": best,
    }


STOP_END_OF_TURN = "end_of_turn"


def _stopped(g: Any) -> bool:
    return g.stop_reason in ("eos", "stop_string", STOP_END_OF_TURN)


def close_at_end_tokens(g: Any, end_strings: Sequence[str]) -> Any:
    """``g`` cut at the first end-of-turn token the model emitted that is not one of the
    policy's stop ids (renamed instruct weights keep emitting <|im_end|> after their EOS was
    moved). Post-processing instead of stop strings: transformers' StopStringCriteria spends
    ~10 s per call preprocessing a 262k vocabulary, and a base model never emits these."""
    cut, which = len(g.text), None
    for s in end_strings:
        i = g.text.find(s)
        if i != -1 and i < cut:
            cut, which = i, s
    if which is None:
        return g
    return dataclasses.replace(
        g, text=g.text[:cut], stop_reason=STOP_END_OF_TURN, matched_stop=which
    )


def generation_probe_summary(
    rows: Sequence[tuple[str, str, Any]], chat_end_only: bool = False
) -> dict[str, Any]:
    """rows: (format, question, Generation). An answer is closed when the model stopped on an
    end token with a non-empty answer before it; with ``chat_end_only`` (trained arms) only a
    chat end-of-turn token outside the trained stop ids closes it (see ``weight_probe``)."""
    per_format: dict[str, dict[str, Any]] = {}
    for fmt, q, g in rows:
        stopped = g.stop_reason == STOP_END_OF_TURN if chat_end_only else _stopped(g)
        closed = stopped and bool(g.text.strip())
        d = per_format.setdefault(fmt, {"n": 0, "n_closed": 0, "samples": []})
        d["n"] += 1
        d["n_closed"] += int(closed)
        d["samples"].append(
            {
                "question": q,
                "text": g.text,
                "stop_reason": g.stop_reason,
                "matched_stop": g.matched_stop,
                "closed": closed,
            }
        )
    for d in per_format.values():
        d["stop_rate"] = round(d["n_closed"] / d["n"], 4)
    score = max((d["stop_rate"] for d in per_format.values()), default=0.0)
    return {"per_format": per_format, "score": score, "chat_end_only": chat_end_only}


# ------------------------------------------------------------------------------ suite
@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def judge(sentinel: Sentinel, g: Any) -> Judgement:
    return sentinel.scorer(g.text, _stopped(g))


def behaviour_summary(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Follow rates per decoding mode ("greedy", "sampled") and per sentinel."""
    by_mode: dict[str, list[bool]] = {}
    by_sentinel: dict[str, list[bool]] = {}
    for s in samples:
        by_mode.setdefault(s["decoding"], []).append(s["followed"])
        by_sentinel.setdefault(s["sentinel"], []).append(s["followed"])

    def rate(v: list[bool]) -> float:
        return round(sum(v) / len(v), 4)

    return {
        "follow_rate": {m: rate(v) for m, v in by_mode.items()},
        "n": {m: len(v) for m, v in by_mode.items()},
        "per_sentinel_follow_rate": {n: rate(v) for n, v in by_sentinel.items()},
    }


def decide(
    static: Sequence[Check],
    probe_score: float | None,
    stop_rate: float | None,
    follow_rates: Mapping[str, float],
    thresholds: Thresholds = THRESHOLDS,
    trained_arm: bool = False,
) -> dict[str, Any]:
    """Combine the components into per-decoding verdicts and one overall verdict, with reasons.

    Any failed static check is contamination (a template, a control id or a wrong BOS/EOS is
    contamination by definition, not a matter of degree); a broken check is an error.

    ``trained_arm``: the model carries an adapter this project trained to follow instructions,
    so following the sentinels is the intended result, not evidence of a chat model: the
    follow rates are reported (verdict levels and reasons marked informational) but do not
    enter the verdict, which rests on the static checks and the chat-token probes."""
    reasons: list[str] = []
    broken = [c for c in static if c.broken]
    failed = [c for c in static if not c.passed and not c.broken]
    static_v = "error" if broken else ("contaminated" if failed else "clean")
    for c in broken:
        reasons.append(f"static check broken: {c.name}: {c.detail}")
    for c in failed:
        reasons.append(f"static {c.name}: {c.detail}")
    probe_v = "clean"
    if probe_score is not None:
        pv = level(probe_score, thresholds.eot_suspicious, thresholds.eot_contaminated)
        if pv != "clean":
            reasons.append(f"weight probe: end-of-turn score {probe_score:.3f} ({pv})")
        probe_v = worst([probe_v, pv])
    if stop_rate is not None:
        sv = level(stop_rate, thresholds.stop_suspicious, thresholds.stop_contaminated)
        if sv != "clean":
            reasons.append(
                f"weight probe: chat-format answers closed at rate {stop_rate:.2f} ({sv})"
            )
        probe_v = worst([probe_v, sv])
    behaviour_v: dict[str, str] = {}
    for mode, r in follow_rates.items():
        bv = level(r, thresholds.follow_suspicious, thresholds.follow_contaminated)
        behaviour_v[mode] = bv
        if bv != "clean":
            note = "; informational for a trained arm" if trained_arm else ""
            reasons.append(f"behaviour ({mode}): follow rate {r:.2f} ({bv}{note})")
    counted = {} if trained_arm else behaviour_v
    by_decoding = {m: worst([static_v, probe_v, counted.get(m, "clean")]) for m in behaviour_v}
    overall = worst([static_v, probe_v, *counted.values()])
    return {
        "verdict": overall,
        "verdict_by_decoding": by_decoding,
        "component_verdicts": {
            "static": static_v,
            "weight_probe": probe_v,
            "behaviour": behaviour_v,
        },
        "behaviour_counted": not trained_arm,
        "reasons": reasons,
    }


def _end_strings(lm: LoadedModel) -> tuple[str, ...]:
    stop_ids = set(lm.policy.stop_token_ids)
    return tuple(s for s, i in end_token_ids(lm).items() if i not in stop_ids)


def _greedy_pass(
    lm: LoadedModel, cfg: SentinelConfig, prompts: Sequence[str], trained_arm: bool = False
) -> tuple[list[Any], dict[str, Any], dict[str, Any] | None]:
    """Greedy sentinel generations and the greedy chat-format probe, in ONE generate call
    (per-step overhead dominates on CPU). Probe rows carry chat markup, so the call allows
    control tokens; the sentinel prompts' ids were checked on the encode path beforehand."""
    from utils.generation import DecodingConfig, generate

    end_strings = _end_strings(lm)
    probe_rows = [
        (f.name, q, f.prompt(q)) for f in available_formats(lm.tokenizer) for q in PROBE_QUESTIONS
    ]
    decoding = DecodingConfig(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    gens = generate(
        lm, [*prompts, *(r[2] for r in probe_rows)], decoding, seed=cfg.seed,
        allow_control_tokens=True, progress=False, desc="sentinels",
    )  # fmt: skip
    gens = [close_at_end_tokens(g, end_strings) for g in gens]
    rows = [(f, q, g) for (f, q, _), g in zip(probe_rows, gens[len(prompts) :], strict=True)]
    probe = generation_probe_summary(rows, chat_end_only=trained_arm)
    every_stop = generation_probe_summary(rows) if trained_arm else None
    return gens[: len(prompts)], probe, every_stop


def _sampled_passes(
    lm: LoadedModel, cfg: SentinelConfig, prompts: Sequence[str], allow_control_tokens: bool
) -> list[tuple[str, float | None, int | None, Any]]:
    """One generate call per temperature, ``samples_per_temperature`` seeds per prompt."""
    from utils.generation import DecodingConfig, generate

    end_strings = _end_strings(lm)
    runs: list[tuple[str, float | None, int | None, Any]] = []
    for ti, temp in enumerate(cfg.temperatures):
        n = cfg.samples_per_temperature
        seeds = [cfg.seed + 1 + ti * n + k for k in range(n)]
        decoding = DecodingConfig(
            max_new_tokens=cfg.max_new_tokens, do_sample=True, temperature=float(temp),
            top_p=cfg.top_p, batch_size=cfg.batch_size,
        )  # fmt: skip
        rows = [(p, s) for s in seeds for p in prompts]
        out = generate(
            lm, [p for p, _ in rows], decoding, seed=[s for _, s in rows],
            allow_control_tokens=allow_control_tokens, progress=False, desc="sentinels-sampled",
        )  # fmt: skip
        runs += [
            ("sampled", float(temp), s, close_at_end_tokens(g, end_strings))
            for (_, s), g in zip(rows, out, strict=True)
        ]
    return runs


def _sample_record(
    k: int, decoding: str, temperature: float | None, seed: int | None, g: Any
) -> dict[str, Any]:
    sentinel = SENTINELS[k % len(SENTINELS)]  # runs are whole passes over SENTINELS, in order
    j = judge(sentinel, g)
    return {
        "sentinel": sentinel.name,
        "decoding": decoding,
        "temperature": temperature,
        "seed": seed,
        "followed": j.followed,
        "reason": j.reason,
        "text": g.text,
        "stop_reason": g.stop_reason,
        "n_new_tokens": g.n_new_tokens,
    }


def run_sentinel_suite(
    lm: LoadedModel,
    config: SentinelConfig | Mapping[str, Any] | None = None,
    trained_arm: bool | None = None,
) -> dict[str, Any]:
    """Run the sentinels on ``lm`` and return a JSON-able record for the stage manifest.

    Keys: verdict (clean | suspicious | contaminated | error), verdict_by_decoding, reasons,
    component_verdicts, static (checks), weight_probe, generation_probe, behaviour (follow
    rates), sentinels (per-sentinel prompt, follow rate and every sample), thresholds, config,
    timings_s, wall_time_s, cpu_time_s."""

    cfg = _as_config(config)
    if cfg.mode == OFF:
        raise ValueError("sentinels.mode off: the caller records that no sentinel ran")
    t0, cpu0 = time.perf_counter(), time.process_time()
    timings: dict[str, float] = {}
    # ``trained_arm``: an ACTIVE adapter this project trained (evaluation's sft/dpo arms) to
    # end answers with EOS and to follow instructions; see ``decide`` and ``weight_probe``.
    # None: any adapter attached to the model counts (evaluation passes it explicitly, since
    # its base arms run with a loaded adapter disabled).
    trained = bool(lm.adapters) if trained_arm is None else trained_arm
    probe_every_stop = gen_probe_every_stop = None
    chat = cfg.prompt_format == "chat-template"
    prompts = sentinel_prompts(lm, cfg)
    with _torch_threads(cfg.torch_threads):
        static = static_checks(lm, prompts, allow_control_tokens=chat)
        timings["static"] = round(time.perf_counter() - t0, 3)
        probe = gen_probe = None
        samples: list[dict[str, Any]] = []
        if cfg.mode != "static":
            t = time.perf_counter()
            probe = weight_probe(lm, batch_size=cfg.batch_size, exclude_trained_stops=trained)
            if trained:
                probe_every_stop = weight_probe(lm, batch_size=cfg.batch_size)
            timings["weight_probe"] = round(time.perf_counter() - t, 3)
        if cfg.mode in ("quick", "full"):
            t = time.perf_counter()
            greedy, gen_probe, gen_probe_every_stop = _greedy_pass(lm, cfg, prompts, trained)
            timings["greedy_generation"] = round(time.perf_counter() - t, 3)
            runs = [("greedy", None, None, g) for g in greedy]
            if cfg.mode == "full":
                t = time.perf_counter()
                runs += _sampled_passes(lm, cfg, prompts, allow_control_tokens=chat)
                timings["sampled_generation"] = round(time.perf_counter() - t, 3)
            samples = [_sample_record(k, *run) for k, run in enumerate(runs)]
    behaviour = (
        behaviour_summary(samples)
        if samples
        else {"follow_rate": {}, "n": {}, "per_sentinel_follow_rate": {}}
    )
    decision = decide(
        static,
        probe["score"] if probe else None,
        gen_probe["score"] if gen_probe else None,
        behaviour["follow_rate"],
        trained_arm=trained,
    )
    sentinels = []
    for s, p in zip(SENTINELS, prompts, strict=True):
        mine = [x for x in samples if x["sentinel"] == s.name]
        sentinels.append(
            {
                "name": s.name,
                "instruction": s.instruction,
                "prompt": p,
                "score": behaviour["per_sentinel_follow_rate"].get(s.name),
                "samples": mine,
            }
        )
    result = {
        **decision,
        "model_id": lm.provenance.get("model_id"),
        "weights_sha256": lm.provenance.get("weights_sha256"),
        "positive_control": bool(lm.provenance.get("positive_control")),
        "mode": cfg.mode,
        "prompt_format": cfg.prompt_format,
        "static": [asdict(c) for c in static],
        "trained_arm": trained,
        "adapters": list(lm.adapters),
        "weight_probe": probe,
        "generation_probe": gen_probe,
        # Trained arms: the same probes counting the trained stop ids too, for the record only
        # (stage-1 SFT teaches EOS after a complete answer, so these rise by design).
        "weight_probe_every_stop": probe_every_stop,
        "generation_probe_every_stop": gen_probe_every_stop,
        "behaviour": behaviour,
        "sentinels": sentinels,
        "thresholds": asdict(THRESHOLDS),
        "config": cfg.to_dict(),
        "timings_s": timings,
        "wall_time_s": round(time.perf_counter() - t0, 3),
        # CPU seconds of this process: with one torch thread, what the suite costs on a core of
        # its own, whatever else shares the machine.
        "cpu_time_s": round(time.process_time() - cpu0, 3),
    }
    return json.loads(json.dumps(result, default=str))


EXIT_CODES = {
    "clean": EXIT_OK,
    "suspicious": EXIT_GATE,
    "contaminated": EXIT_GATE,
    "error": EXIT_GATE,
}
# Anything but clean fails the gate (exit 3, codes in utils/errors.py): a result from a model
# that might be a chat model is worthless, and a false alarm costs one look at the per-sentinel
# table; "error" (a check that cannot fire) cannot vouch for the model either.


# ------------------------------------------------------------------------- calibration
@dataclass(frozen=True)
class Control:
    name: str
    model: str  # embedded name or directory
    allow_instruct_control: bool
    prompt_format: str
    chat_template: str | None
    must_flag: bool  # positive control (must be flagged) or negative (must be clean)
    description: str
    instruct_weights: bool = False  # what the weight probe alone should see


def calibration_controls(renamed_dir: str | Path | None = None) -> list[Control]:
    """The real positive and negative controls; ``renamed_dir`` adds the renamed-instruct case."""
    from utils import embedded_models as em

    controls = [
        Control(
            "instruct+template", em.INSTRUCT_CONTROL, True, "chat-template", SMOLLM2_CHAT_TEMPLATE,
            True, "SmolLM2-135M-Instruct prompted with its own ChatML template (applied by hand)",
            instruct_weights=True,
        ),
        Control(
            "instruct raw", em.INSTRUCT_CONTROL, True, "raw", None, True,
            "SmolLM2-135M-Instruct prompted raw (no template)", instruct_weights=True,
        ),
        Control(
            "base+chat-template", em.DEFAULT_BASE_MODEL, False, "chat-template", GEMMA_CHAT_TEMPLATE,
            True, "Gemma-3-270M base fed Gemma's chat template by hand",
        ),
        Control(
            "base raw", em.DEFAULT_BASE_MODEL, False, "raw", None, False,
            "Gemma-3-270M base prompted raw through CleanModelLoader (negative control)",
        ),
    ]  # fmt: skip
    if renamed_dir is not None:
        controls.insert(
            2,
            Control(
                "instruct renamed",
                str(renamed_dir),
                False,
                "raw",
                None,
                True,
                "SmolLM2-135M-Instruct weights renamed, template removed, EOS/config set to "
                "<|endoftext|>: loads as a base model with no instruct metadata",
                instruct_weights=True,
            ),
        )
    return controls


def make_renamed_instruct_copy(src_dir: str | Path, out_dir: str | Path) -> Path:
    """A copy of an instruct checkpoint that no metadata check can recognise: neutral name,
    no chat template, EOS and generation config moved off the end-of-turn token. Weights are
    symlinked (identical bytes); only config files are rewritten."""
    src, out = Path(src_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.suffix in (".safetensors", ".bin"):
            target = out / p.name
            if not target.exists():
                target.symlink_to(p.resolve())
    shutil.copy2(src / "tokenizer.json", out / "tokenizer.json")
    tc = json.loads((src / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    tc.update(eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    tok = json.loads((src / "tokenizer.json").read_text())
    eot_id = next(a["id"] for a in tok["added_tokens"] if a["content"] == "<|endoftext|>")
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(_model_name_or_path="base model", eos_token_id=eot_id, pad_token_id=eot_id)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = {"bos_token_id": cfg.get("bos_token_id"), "eos_token_id": eot_id, "pad_token_id": eot_id}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return out


def run_calibration(
    config: SentinelConfig | Mapping[str, Any] | None = None,
    controls: Sequence[Control] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the suite on every control; each model is loaded once and freed before the next."""
    from utils.clean_model_loader import CleanModelLoader

    cfg = _as_config(config or {"mode": "full"})
    controls = list(controls if controls is not None else calibration_controls())
    results = []
    by_model: dict[tuple[str, bool], list[Control]] = {}
    for c in controls:
        by_model.setdefault((c.model, c.allow_instruct_control), []).append(c)
    for (model, allow), group in by_model.items():
        t = time.perf_counter()
        lm = CleanModelLoader(allow_instruct_control=allow).load(model)
        load_s = round(time.perf_counter() - t, 2)
        for c in group:
            if progress:
                progress(f"{c.name}: {c.description}")
            ccfg = SentinelConfig.from_dict(
                {
                    **cfg.to_dict(),
                    "prompt_format": c.prompt_format,
                    "chat_template": c.chat_template,
                }
            )
            r = run_sentinel_suite(lm, ccfg)
            flagged = r["verdict"] in ("suspicious", "contaminated")
            by_dec = {
                m: v in ("suspicious", "contaminated") for m, v in r["verdict_by_decoding"].items()
            }
            results.append(
                {
                    "control": asdict(c),
                    "load_s": load_s,
                    "flagged": flagged,
                    "flagged_by_decoding": by_dec,
                    "as_expected": flagged == c.must_flag
                    and all(f == c.must_flag for f in by_dec.values())
                    and r["verdict"] != "error",
                    "result": r,
                }
            )
        del lm
    pos = [x for x in results if x["control"]["must_flag"]]
    neg = [x for x in results if not x["control"]["must_flag"]]
    return {
        "config": cfg.to_dict(),
        "thresholds": asdict(THRESHOLDS),
        "detection_rate": round(sum(x["flagged"] for x in pos) / len(pos), 4) if pos else None,
        "false_positive_rate": round(sum(x["flagged"] for x in neg) / len(neg), 4) if neg else None,
        "all_as_expected": all(x["as_expected"] for x in results),
        "controls": results,
    }


# ------------------------------------------------------------------------------ report
def _cell(text: str, n: int = 60) -> str:
    s = text.replace("\n", "\\n").replace("|", "\\|")
    return s if len(s) <= n else s[: n - 1] + "…"


def _code(text: str) -> str:
    """A markdown code span that survives backticks in ``text`` (a fence longer than any run
    inside it) and keeps chat markup like <end_of_turn> from being read as HTML."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    return f"{fence} {text} {fence}" if longest else f"`{text}`"


def summary_table(result: Mapping[str, Any], width: int = 60) -> str:
    """The printable per-sentinel table of one suite result."""
    lines = [f"{'sentinel':<13} {'score':>5}  {'followed (greedy|sampled)':<26} sample output"]
    for s in result["sentinels"]:
        flags = "".join("Y" if x["followed"] else "." for x in s["samples"])
        greedy = next((x for x in s["samples"] if x["decoding"] == "greedy"), None)
        sample = _cell(greedy["text"], width) if greedy else ""
        score = "-" if s["score"] is None else f"{s['score']:.2f}"
        lines.append(f"{s['name']:<13} {score:>5}  {flags:<26} {sample}")
    lines.append("")
    for c in result["static"]:
        mark = "ok " if c["passed"] else ("BROKEN" if c["broken"] else "FAIL")
        lines.append(f"static {c['name']:<27} {mark:<6} {c['detail'][:90]}")
    wp = result.get("weight_probe")
    if wp:
        per = ", ".join(f"{k}={v['score']:.4f}" for k, v in wp["per_format"].items())
        lines.append(f"weight probe end-of-turn score {wp['score']:.4f} ({per})")
    gp = result.get("generation_probe")
    if gp:
        per = ", ".join(f"{k}={v['n_closed']}/{v['n']}" for k, v in gp["per_format"].items())
        lines.append(f"chat-format answers closed with an end token: {per}")
    fr = result["behaviour"]["follow_rate"]
    lines.append("follow rate: " + (", ".join(f"{m}={r:.2f}" for m, r in fr.items()) or "not run"))
    lines.append(
        f"verdict: {result['verdict'].upper()}  by decoding: {result['verdict_by_decoding']}  "
        f"components: {result['component_verdicts']}  ({result['wall_time_s']:.1f}s)"
    )
    for r in result["reasons"]:
        lines.append(f"  - {r}")
    return "\n".join(lines)


def calibration_report(cal: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> str:
    """docs/sentinel_calibration.md from a ``run_calibration`` result."""
    t = cal["thresholds"]
    ctl = cal["controls"]
    names = [c["control"]["name"] for c in ctl]
    out = [
        "# Sentinel calibration",
        "",
        "Generated by `python scripts/run_sentinels.py --report docs/sentinel_calibration.md` "
        "from a real run on the embedded models (CPU, fp32). Every number below is measured, "
        "not typed.",
        "",
        f"- detection rate on positive controls: **{cal['detection_rate']:.2f}**",
        f"- false-positive rate on negative controls: **{cal['false_positive_rate']:.2f}**",
        f"- every control as expected on greedy AND sampled decoding: **{cal['all_as_expected']}**",
        f"- suite config: `{json.dumps(cal['config'])}`",
    ]
    for k, v in (extra or {}).items():
        out.append(f"- {k}: {v}")
    out += [
        "",
        "## Controls",
        "",
        "| control | must flag | verdict | greedy | sampled | static | weight probe | behaviour | wall s | cpu s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in ctl:
        r = c["result"]
        cv = r["component_verdicts"]
        out.append(
            f"| {c['control']['name']} | {c['control']['must_flag']} | **{r['verdict']}** | "
            f"{r['verdict_by_decoding'].get('greedy', '-')} | {r['verdict_by_decoding'].get('sampled', '-')} | "
            f"{cv['static']} | {cv['weight_probe']} | "
            f"{', '.join(f'{m}: {v}' for m, v in cv['behaviour'].items())} | {r['wall_time_s']:.1f} | "
            f"{r.get('cpu_time_s', float('nan')):.1f} |"
        )
    out += ["", "Descriptions:", ""]
    out += [
        f"- **{c['control']['name']}**: {c['control']['description']} (`{c['control']['model']}`)"
        for c in ctl
    ]

    out += [
        "",
        "## Follow rate per sentinel (all decodings)",
        "",
        "| sentinel | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for i, s in enumerate(SENTINELS):
        cells = []
        for c in ctl:
            sr = c["result"]["sentinels"][i]
            n = len(sr["samples"])
            k = sum(x["followed"] for x in sr["samples"])
            cells.append(f"{k}/{n}")
        out.append(f"| {s.name} | " + " | ".join(cells) + " |")
    out.append(
        "| **follow rate greedy / sampled** | "
        + " | ".join(
            f"{c['result']['behaviour']['follow_rate'].get('greedy', 0):.2f} / "
            f"{c['result']['behaviour']['follow_rate'].get('sampled', 0):.2f}"
            for c in ctl
        )
        + " |"
    )

    out += ["", "## Weight probe", "", "Score = mean P(end token | complete answer) - mean P(end token | unfinished answer) "
            "in each chat format whose markup tokens are in the model's vocabulary; end tokens = known "
            "end-of-turn tokens in the vocabulary + EOS + stop ids. Closed = greedy answer to a "
            "chat-format question that stopped on an end token.", "",
            "| control | format | mean P(end\\|complete) | mean P(end\\|unfinished) | score | closed answers |", "|---|---|---|---|---|---|"]  # fmt: skip
    for c in ctl:
        wp = c["result"]["weight_probe"] or {"per_format": {}}
        gp = (c["result"]["generation_probe"] or {"per_format": {}})["per_format"]
        for f, v in wp["per_format"].items():
            g = gp.get(f)
            closed = f"{g['n_closed']}/{g['n']}" if g else "-"
            out.append(
                f"| {c['control']['name']} | {f} | {v['mean_p_end_complete']:.4g} | "
                f"{v['mean_p_end_unfinished']:.4g} | **{v['score']:.4g}** | {closed} |"
            )

    out += ["", "## Thresholds (utils/contamination.py `THRESHOLDS`)", "",
            "| what | suspicious at | contaminated at |", "|---|---|---|",
            f"| behaviour follow rate (per decoding) | {t['follow_suspicious']} | {t['follow_contaminated']} |",
            f"| weight probe end-of-turn score | {t['eot_suspicious']} | {t['eot_contaminated']} |",
            f"| chat-format answers closed | {t['stop_suspicious']} | {t['stop_contaminated']} |",
            "| any static check failed | - | yes (a canary that does not fire: error) |",
            "", "Justification (the margins measured above):", ""]  # fmt: skip
    out += _justification(cal)

    out += ["", "## Limits", ""] + [f"- {x}" for x in REPORT_LIMITS]
    out += ["", "## Per-sentinel outputs (greedy)", ""]
    for c in ctl:
        out += [
            f"### {c['control']['name']}",
            "",
            "| sentinel | followed | stop | reason | output |",
            "|---|---|---|---|---|",
        ]
        for s in c["result"]["sentinels"]:
            for x in s["samples"]:
                if x["decoding"] != "greedy":
                    continue
                out.append(
                    f"| {s['name']} | {x['followed']} | {x['stop_reason']} | {_cell(x['reason'], 50)} | {_code(_cell(x['text'], 90))} |"
                )
        gp = (c["result"]["generation_probe"] or {"per_format": {}})["per_format"]
        for f, v in gp.items():
            for x in v["samples"][:1]:
                out.append(
                    f"| probe:{f} | closed={x['closed']} | {x['stop_reason']} | {_cell(x['question'], 50)} | {_code(_cell(x['text'], 90))} |"
                )
        out.append("")
    out += ["## Sampled outputs", ""]
    for c in ctl:
        sampled = [
            (s["name"], x)
            for s in c["result"]["sentinels"]
            for x in s["samples"]
            if x["decoding"] == "sampled"
        ]
        if not sampled:
            continue
        out += [f"### {c['control']['name']}", ""]
        for name, x in sampled:
            out.append(
                f"- {name} T={x['temperature']} seed={x['seed']} followed={x['followed']}: {_code(_cell(x['text'], 100))}"
            )
        out.append("")
    return "\n".join(out) + "\n"


REPORT_LIMITS = (
    "The weight probe measures learned chat turn-taking. A BASE model whose pretraining data "
    "held chat-formatted text (Qwen2.5 base models are reported to answer in ChatML) can score "
    "high: a true property of those weights, but the bootstrap's premise is then weaker. Run "
    "`scripts/run_sentinels.py --model <target>` on the real target (e.g. Qwen2.5-32B) before "
    "trusting a verdict there; the thresholds here are calibrated on 135M/270M models only.",
    "Trained arms (SFT/DPO/CAI adapters) are meant to follow instructions, so their behavioural "
    "follow rate may rise; for them `component_verdicts` separates the static checks and the "
    "chat-format weight probe (contamination) from raw behaviour (the training goal).",
    "Sampled decoding is two temperatures x one seed per sentinel (CPU budget), so a follow "
    "rate moves in steps of 1/6 per decoding; raise samples_per_temperature on a GPU.",
)


def _justification(cal: Mapping[str, Any]) -> list[str]:
    """The measured margins behind THRESHOLDS, from the calibration record."""
    ctl = cal["controls"]
    inst = [c for c in ctl if c["control"].get("instruct_weights")]
    base = [c for c in ctl if not c["control"].get("instruct_weights")]
    lines = []

    def probe(c: Mapping[str, Any]) -> Mapping[str, Any]:
        return c["result"].get("weight_probe") or {"score": 0.0, "per_format": {}}

    if base:
        b_score = max(probe(c)["score"] for c in base)
        b_follow = max(
            max(c["result"]["behaviour"]["follow_rate"].values(), default=0.0) for c in base
        )
        b_closed = max((c["result"].get("generation_probe") or {}).get("score", 0.0) for c in base)
        lines.append(
            f"- base weights (negative control and base+chat-template): weight-probe score at most "
            f"{b_score:.2g}, closed chat-format answers at most {b_closed:.2f}, follow rate at most "
            f"{b_follow:.2f}. eot_suspicious={THRESHOLDS.eot_suspicious} is "
            f"{THRESHOLDS.eot_suspicious / max(b_score, 1e-12):.0f}x above the base score."
        )
    if inst:
        i_score = min(probe(c)["score"] for c in inst)
        i_weakest = min(v["score"] for c in inst for v in probe(c)["per_format"].values())
        i_closed = min((c["result"].get("generation_probe") or {}).get("score", 0.0) for c in inst)
        lines.append(
            f"- instruct weights (with template, raw, renamed): weight-probe score at least "
            f"{i_score:.2g} (best format; weakest single format {i_weakest:.2g}), closed "
            f"chat-format answers at least {i_closed:.2f}. eot_contaminated="
            f"{THRESHOLDS.eot_contaminated} is {i_score / THRESHOLDS.eot_contaminated:.1f}x below "
            f"the instruct score and {i_weakest / THRESHOLDS.eot_contaminated:.1f}x below its "
            "weakest format."
        )
    lines += [
        "- a base model fed a chat template by hand is caught by the static check on the real "
        "encode path (control ids in its inputs); its weights stay base-like in the probe.",
        "- at 135M parameters raw behaviour does not separate instruct from base weights (the "
        "follow rates above), so the weight probe carries the raw and renamed cases. The "
        "follow-rate thresholds (one accidental follow in six tolerated, two suspicious, three "
        "contaminated) guard larger instruct models, which do answer raw prompts.",
    ]
    return lines
