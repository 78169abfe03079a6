"""CleanModelLoader: the ONLY way the project loads a model and tokenizer for base-model work.

Every stage gets its model, tokenizer and token ids from here, so the guards against a base
model being secretly prompted as a chat model are structural, not a convention:

- the tokenizer's chat_template is removed (Qwen2.5 BASE ships one) and ``apply_chat_template``
  on the handed-out tokenizer raises ``ChatTemplateError``;
- chat-control tokens are derived from the tokenizer itself (its special added tokens and every
  added token its original template used), so <|im_start|>, <start_of_turn>,
  <|start_header_id|> ... are all caught without a hard-coded list;
- ``encode`` is the one encode path: model-aware BOS (exactly one for Gemma, none for Qwen),
  and it refuses text that contains a chat-control token unless explicitly allowed;
- a model that looks instruction-tuned (name, EOS = end-of-turn token, generation config) is
  refused unless the caller marks it as a positive control;
- provenance (weights hash, tokenizer hash, removed-template hash, BOS/EOS policy, versions,
  attention kernel, where the weights were placed) is recorded for every manifest.

Placement (``plan_placement``): each process of a multi-GPU launch loads onto its own GPU
(``cuda:LOCAL_RANK``), quantised models included; under FSDP with ``cpu_ram_efficient_loading``
only local rank 0 reads the weights and ranks > 0 get a meta-device skeleton that accelerate fills
from rank 0 when it prepares the model (docs/scaling.md).

See BASE_MODEL_TRUTH.md for every contamination vector and the test that covers it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from utils import embedded_models
from utils.chat_markup import END_OF_TURN_TOKENS as END_OF_TURN_TOKENS
from utils.config import ConfigError
from utils.errors import InputMissingError, ProjectInputError
from utils.provenance import package_versions

TEMPLATE_REMOVED_MARKER = "chat template removed by CleanModelLoader"

# END_OF_TURN_TOKENS (imported above from the one list in utils/chat_markup.py): content of
# end-of-turn tokens in common chat formats; an EOS equal to one of these means the checkpoint
# was trained (or configured) to stop at the end of a chat turn.
# ``model.attn_implementation``: null leaves transformers' default (sdpa where the model has it);
# eager for Gemma training (transformers' advice), flash_attention_2 on a GPU with flash-attn.
ATTN_IMPLEMENTATIONS: tuple[str | None, ...] = (None, "eager", "sdpa", "flash_attention_2")
# Names that mark instruction-tuned checkpoints (word-ish boundaries, case-insensitive).
INSTRUCT_NAME_PATTERN = re.compile(
    r"(instruct|[-_.]chat\b|\bchat[-_.]|[-_.]it\b|[-_.]it[-_.]|rlhf|[-_.]sft\b|[-_.]dpo\b|assistant|tulu|zephyr|vicuna)",
    re.IGNORECASE,
)


class ContaminationError(ProjectInputError, RuntimeError):
    """Chat formatting would reach a base model (template, control token, instruct weights)."""


class ChatTemplateError(ContaminationError):
    pass


class InstructModelError(ContaminationError):
    pass


class AdapterMismatchError(ProjectInputError, RuntimeError):
    pass


def _refuse_chat_template(*args: Any, **kwargs: Any) -> Any:
    # Module-level (not a closure) so the patched tokenizer still pickles for datasets.map.
    raise ChatTemplateError(
        "apply_chat_template was called on a base-model tokenizer handed out by CleanModelLoader. "
        "Base models are prompted in the plain 'Instruction: ...\\nResponse:' format "
        "(utils/response_format.py); a chat template would contaminate every result."
    )


@dataclass(frozen=True)
class TokenPolicy:
    """How text becomes token ids for this model, derived from its tokenizer."""

    add_bos: bool
    bos_token_id: int | None
    eos_token_id: int
    eos_token: str
    pad_token_id: int
    stop_token_ids: tuple[int, ...]  # what generation stops on; must contain eos_token_id
    control_token_ids: frozenset[int]
    control_token_strings: tuple[str, ...]


def derive_control_tokens(
    tokenizer: Any, original_template: str | None
) -> tuple[frozenset[int], tuple[str, ...]]:
    """Chat-control tokens of ``tokenizer``: every special added token, plus every added token
    whose text appears in the original chat template (Qwen's <tool_call>, <think> are not
    flagged special but are template markup). BOS is included: it is placed by the policy,
    never by text."""
    ids: set[int] = set()
    strings: set[str] = set()
    template = original_template or ""
    for tid, added in tokenizer.added_tokens_decoder.items():
        content = added.content
        if not content.strip():
            continue  # Gemma's added whitespace-run tokens are text, not control
        if added.special or (content in template):
            ids.add(int(tid))
            strings.add(content)
    for tok_str in getattr(tokenizer, "all_special_tokens", []):
        tid = tokenizer.convert_tokens_to_ids(tok_str)
        if isinstance(tid, int) and tid != getattr(tokenizer, "unk_token_id", None):
            ids.add(tid)
            strings.add(tok_str)
    # Longest first, so the reported match for "<|im_start|>" is not a shorter prefix token.
    return frozenset(ids), tuple(sorted(strings, key=lambda s: (-len(s), s)))


def derive_token_policy(
    tokenizer: Any, generation_config: Any, original_template: str | None
) -> TokenPolicy:
    probe = tokenizer("a").input_ids
    bos_id = tokenizer.bos_token_id
    add_bos = bos_id is not None and len(probe) > 0 and probe[0] == bos_id
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ContaminationError(
            "tokenizer has no eos_token; a trained model could never learn to stop"
        )
    gen_eos = (
        getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    )
    if gen_eos is None:
        stop_ids: tuple[int, ...] = (eos_id,)
    elif isinstance(gen_eos, int):
        stop_ids = (gen_eos,) if gen_eos == eos_id else (eos_id, gen_eos)
    else:
        stop_ids = tuple(dict.fromkeys([eos_id, *gen_eos]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    control_ids, control_strings = derive_control_tokens(tokenizer, original_template)
    return TokenPolicy(
        add_bos=add_bos,
        bos_token_id=bos_id if add_bos else None,
        eos_token_id=eos_id,
        eos_token=tokenizer.eos_token,
        pad_token_id=pad_id,
        stop_token_ids=stop_ids,
        control_token_ids=control_ids,
        control_token_strings=control_strings,
    )


def instruct_signals(
    name_or_path: str, tokenizer: Any, generation_config: Any, config: Any
) -> list[str]:
    """Reasons to believe a checkpoint is instruction-tuned; empty for a clean base model.

    A chat template alone is NOT a signal: Qwen2.5 base ships one. Names are read from the
    path, the config's ``_name_or_path`` and an asset record; EOS from tokenizer and
    generation config."""
    reasons = []
    names = [str(name_or_path), str(getattr(config, "_name_or_path", "") or "")]
    for n in names:
        m = INSTRUCT_NAME_PATTERN.search(Path(n).name if os.sep in n else n)
        if m:
            reasons.append(f"name {n!r} contains {m.group(0)!r}")
    eos = getattr(tokenizer, "eos_token", None)
    if eos in END_OF_TURN_TOKENS:
        reasons.append(f"tokenizer eos_token is the chat end-of-turn token {eos!r}")
    gen_eos = (
        getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    )
    for tid in [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or []):
        tok_str = tokenizer.convert_ids_to_tokens(int(tid))
        if tok_str in END_OF_TURN_TOKENS:
            reasons.append(f"generation_config stops on end-of-turn token {tok_str!r} (id {tid})")
    return reasons


def tokenizer_hash(tokenizer: Any) -> str:
    """SHA-256 of the tokenizer's full serialisation (vocab, merges, added tokens, normaliser)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(
        tokenizer, "_tokenizer", None
    )
    if backend is not None:
        payload = backend.to_str()
    else:
        payload = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def weights_hash(model_dir: Path) -> str:
    """SHA-256 over the sorted (file name, file sha256) of every weight file in ``model_dir``.

    File hashes are cached by (path, size, mtime) so a 64 GB checkpoint is hashed once."""
    files = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
    if not files:
        raise InputMissingError(f"{model_dir}: no weight files (*.safetensors, *.bin, *.gguf)")
    cache_file = embedded_models.cache_root() / "hash_cache.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, json.JSONDecodeError):
        cache = {}
    h = hashlib.sha256()
    changed = False
    for p in files:
        st = p.stat()
        key = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        digest = cache.get(key)
        if digest is None:
            digest = embedded_models.sha256_file(p)
            cache[key] = digest
            changed = True
        h.update(f"{p.name}:{digest}\n".encode())
    if changed:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cache_file)
        except OSError:
            pass  # a read-only cache only costs re-hashing next time
    return h.hexdigest()


@dataclass
class LoadedModel:
    """A model and tokenizer that passed the loader's guards, plus the one encode path."""

    model: Any
    tokenizer: Any
    policy: TokenPolicy
    provenance: dict[str, Any]
    model_dir: Path | None = None
    sentinel_result: dict[str, Any] | None = None
    adapters: list[str] = field(default_factory=list)
    # Derived, read-only helpers keyed by their inputs (e.g. stop-string matchers, which cost
    # seconds to build over a 262k vocabulary); no generation state lives here.
    derived_cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    # -- the one encode path -------------------------------------------------------------
    def encode(self, text: str, allow_control_tokens: bool = False) -> list[int]:
        """Token ids for ``text`` as the model must see it: BOS per policy, never chat markup.

        Raises ``ContaminationError`` naming the token and character offset when ``text``
        contains a chat-control token, unless ``allow_control_tokens`` (positive controls only).
        """
        return encode_text(self.tokenizer, self.policy, text, allow_control_tokens)

    def encode_batch(
        self, texts: Sequence[str], allow_control_tokens: bool = False
    ) -> list[list[int]]:
        return [self.encode(t, allow_control_tokens) for t in texts]

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` as a continuation (no BOS): what max_new_tokens counts."""
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)

    def check_ids(self, ids: Sequence[int], where: str = "input") -> None:
        """Raise if any already-encoded input carries a chat-control token (the static sentinel
        checks the ids a stage actually fed the model, not re-encoded text)."""
        check_token_ids(self.policy, ids, where)

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device


def check_token_ids(policy: TokenPolicy, ids: Sequence[int], where: str = "input") -> None:
    start = 1 if policy.add_bos else 0
    if policy.add_bos and (not ids or ids[0] != policy.bos_token_id):
        raise ContaminationError(
            f"{where}: expected exactly one BOS ({policy.bos_token_id}) at position 0"
        )
    for pos in range(start, len(ids)):
        if ids[pos] in policy.control_token_ids:
            raise ContaminationError(f"{where}: chat-control token id {ids[pos]} at position {pos}")


def encode_text(
    tokenizer: Any, policy: TokenPolicy, text: str, allow_control_tokens: bool = False
) -> list[int]:
    if not allow_control_tokens:
        for s in policy.control_token_strings:
            pos = text.find(s)
            if pos != -1:
                raise ContaminationError(
                    f"text contains the chat-control token {s!r} at character {pos}: "
                    f"{text[max(0, pos - 30) : pos + len(s) + 30]!r}. Base-model prompts must not "
                    "carry chat markup; pass allow_control_tokens=True only for a positive control."
                )
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if policy.add_bos:
        ids = [policy.bos_token_id, *ids]
    if not allow_control_tokens:
        check_token_ids(policy, ids, where="encoded text")
    return ids


def _strip_template(tokenizer: Any) -> str | None:
    original = getattr(tokenizer, "chat_template", None)
    if isinstance(original, dict):  # multiple named templates
        original = "\n".join(str(v) for v in original.values())
    tokenizer.chat_template = None
    # Instance attributes shadow the methods, so TRL, pipelines or user code cannot format.
    tokenizer.apply_chat_template = _refuse_chat_template
    if hasattr(tokenizer, "init_kwargs"):
        tokenizer.init_kwargs.pop("chat_template", None)
    return original


def resolve_model(name_or_path: str | None) -> tuple[str, Path | None]:
    """(display id, local directory or None for a hub id). ``MODEL_PATH`` wins when no name given."""
    name = (
        name_or_path
        or os.environ.get(embedded_models.MODEL_PATH_ENV)
        or embedded_models.DEFAULT_BASE_MODEL
    )
    if name in embedded_models.ASSETS:
        return name, embedded_models.ensure_asset(name)
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise InputMissingError(
                f"model path {p} is a file; give the directory with config.json"
            )
        return name, p.resolve()
    if (
        name.startswith((".", "/", "~"))
        or os.sep in name
        and not re.fullmatch(r"[\w.-]+/[\w.-]+", name)
    ):
        raise InputMissingError(
            f"model path {name!r} does not exist (and is not a hub id 'org/name')"
        )
    return name, None  # a hub id such as Qwen/Qwen2.5-32B, resolved by transformers


def local_rank() -> int:
    """This process's GPU index within its node under torchrun / accelerate launch, else 0."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(device: str | None, cuda_available: bool | None = None) -> str:
    """The device this process loads onto: the requested one, else ``cuda`` when a GPU exists;
    a bare ``cuda`` becomes ``cuda:LOCAL_RANK`` so each process of a multi-GPU launch takes its
    own GPU (an explicit index is kept). CPU stays CPU."""
    if device is None:
        if cuda_available is None:
            import torch

            cuda_available = torch.cuda.is_available()
        device = "cuda" if cuda_available else "cpu"
    if device == "cuda":
        device = f"cuda:{local_rank()}"
    return device


@dataclass(frozen=True)
class Placement:
    """Where ``from_pretrained`` puts this process's weights (recorded in the provenance).

    mode: ``device_map`` (loaded straight onto ``device``), ``move`` (loaded, then ``.to``),
    ``fsdp_rank0_cpu`` (FSDP RAM-efficient loading, local rank 0: the one full copy, in CPU RAM;
    accelerate shards it onto the GPUs), ``meta`` (FSDP RAM-efficient loading, ranks > 0: no
    weights read; accelerate broadcasts rank 0's when it prepares the model)."""

    mode: str
    device: str
    device_map: dict[str, str] | None = None


def plan_placement(
    device: str,
    quantized: bool,
    fsdp_cpu_ram_efficient: bool = False,
    rank: int = 0,
    deepspeed_zero3: bool = False,
) -> Placement:
    """The placement for ``device`` (already resolved, e.g. ``cuda:1``); pure, so it is tested
    without a GPU. Quantised weights cannot move after loading and accelerate refuses a 4/8-bit
    model on another GPU than the process's, so they always go through ``device_map``;
    transformers and accelerate keep quantised models out of the FSDP meta-device path."""
    if quantized:
        return Placement("device_map", device, {"": device})
    if fsdp_cpu_ram_efficient:
        return Placement("meta", "meta") if rank > 0 else Placement("fsdp_rank0_cpu", "cpu")
    if deepspeed_zero3:  # zero.Init partitions at load; transformers refuses a device_map there
        return Placement("move", device)
    if device.startswith("cuda"):  # straight from the mmapped files to the GPU: no CPU copy
        return Placement("device_map", device, {"": device})
    return Placement("move", device)


def _launch_state() -> tuple[bool, bool]:
    """(FSDP with cpu_ram_efficient_loading, DeepSpeed ZeRO-3), as transformers itself decides
    them at load: accelerate's launch environment plus an initialised process group."""
    from transformers.integrations import is_deepspeed_zero3_enabled, is_fsdp_enabled

    return bool(is_fsdp_enabled()), bool(is_deepspeed_zero3_enabled())


def _meta_skeleton(config: Any, kwargs: dict[str, Any]) -> Any:
    """The model with every parameter on the meta device (no weights read, no RAM): accelerate's
    FSDP preparation fills it from rank 0. Buffers stay real (rotary tables are not in the
    checkpoint; accelerate re-registers them after sharding)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    model.tie_weights()  # as from_pretrained leaves it: the FSDP state dict has tied entries
    return model


class CleanModelLoader:
    """Load a base model for bootstrap work with every contamination guard in place.

    >>> lm = CleanModelLoader().load("gemma-3-270m")       # embedded default
    >>> lm.encode("Instruction: Name a colour.\\nResponse:")  # one BOS, no chat tokens

    ``allow_instruct_control=True`` marks the load as a POSITIVE CONTROL (contamination tests
    only): instruct signals are recorded instead of refused, and the template is still removed.
    """

    def __init__(
        self,
        device: str | None = None,
        dtype: str | None = None,
        quantization: str | None = None,
        trust_remote_code: bool = False,
        allow_instruct_control: bool = False,
        attn_implementation: str | None = None,
    ):
        if attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ConfigError(
                f"model.attn_implementation must be one of {list(ATTN_IMPLEMENTATIONS)} "
                f"(null = transformers' default), got {attn_implementation!r}"
            )
        self.device = device
        self.dtype = dtype
        self.quantization = quantization
        self.trust_remote_code = trust_remote_code
        self.allow_instruct_control = allow_instruct_control
        self.attn_implementation = attn_implementation

    @classmethod
    def from_config(cls, model_cfg: dict[str, Any]) -> tuple[CleanModelLoader, str | None]:
        """(loader, model name) from a config's ``model`` section; unknown keys are an error."""
        known = {
            "name",
            "device",
            "dtype",
            "quantization",
            "trust_remote_code",
            "allow_instruct_control",
            "attn_implementation",
        }
        unknown = set(model_cfg) - known
        if unknown:
            raise ConfigError(
                f"model config: unknown keys {sorted(unknown)}; known: {sorted(known)}"
            )
        kwargs = {k: v for k, v in model_cfg.items() if k != "name"}
        return cls(**kwargs), model_cfg.get("name")

    # -- tokenizer ----------------------------------------------------------------------
    def load_tokenizer(
        self, name_or_path: str | None = None
    ) -> tuple[Any, str | None, Path | None, str]:
        """(clean tokenizer, removed template, local dir, display id)."""
        from transformers import AutoTokenizer

        display, local = resolve_model(name_or_path)
        src = str(local) if local is not None else display
        try:
            tok = AutoTokenizer.from_pretrained(src, trust_remote_code=self.trust_remote_code)
        except OSError as e:
            raise InputMissingError(f"cannot load a tokenizer from {src!r}: {e}") from e
        original = _strip_template(tok)
        tok.padding_side = "left"  # generation pads on the left; trainers set their own side
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        return tok, original, local, display

    # -- model --------------------------------------------------------------------------
    def load(self, name_or_path: str | None = None) -> LoadedModel:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

        tok, original_template, local, display = self.load_tokenizer(name_or_path)
        src = str(local) if local is not None else display
        try:
            config = AutoConfig.from_pretrained(src, trust_remote_code=self.trust_remote_code)
        except (OSError, ValueError) as e:
            raise InputMissingError(f"cannot read a model config from {src!r}: {e}") from e
        try:
            gen_config = GenerationConfig.from_pretrained(src)
        except OSError:
            gen_config = None
        signals = instruct_signals(display, tok, gen_config, config)
        asset_record = local / "asset.json" if local is not None else None
        if (
            asset_record is not None
            and asset_record.exists()
            and json.loads(asset_record.read_text()).get("is_instruct")
        ):
            signals.append(f"embedded asset {display!r} is recorded as instruction-tuned")
        if signals and not self.allow_instruct_control:
            raise InstructModelError(
                f"{display!r} looks instruction-tuned: " + "; ".join(signals) + ". This project "
                "bootstraps BASE models; pass allow_instruct_control=True (--allow-instruct-control) "
                "only to use it as a contamination positive control."
            )
        policy = derive_token_policy(tok, gen_config, original_template)

        device = resolve_device(self.device)
        dtype_name = self.dtype or ("float32" if device == "cpu" else "bfloat16")
        kwargs: dict[str, Any] = {
            "dtype": getattr(torch, dtype_name),
            "trust_remote_code": self.trust_remote_code,
        }
        if self.attn_implementation is not None:
            kwargs["attn_implementation"] = self.attn_implementation
        quantized = self.quantization in ("4bit", "8bit")
        if quantized:
            try:
                import bitsandbytes  # noqa: F401
            except ImportError as e:
                raise ImportError(
                    f"quantization={self.quantization!r} needs bitsandbytes (GPU only): "
                    "pip install bitsandbytes"
                ) from e
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=self.quantization == "4bit",
                load_in_8bit=self.quantization == "8bit",
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=torch.bfloat16,
                bnb_4bit_use_double_quant=True,
            )
        elif self.quantization not in (None, "none"):
            raise ConfigError(
                f"quantization must be None, '4bit' or '8bit', got {self.quantization!r}"
            )
        fsdp_ram_efficient, zero3 = _launch_state()
        placement = plan_placement(device, quantized, fsdp_ram_efficient, local_rank(), zero3)
        if placement.device_map is not None:
            kwargs["device_map"] = placement.device_map
        try:
            if placement.mode == "meta":
                model = _meta_skeleton(config, kwargs)
            else:
                model = AutoModelForCausalLM.from_pretrained(src, **kwargs)
        except Exception as e:
            if (
                self.attn_implementation is not None
                and isinstance(e, (ImportError, ValueError))
                and re.search(r"attn|attention", str(e), re.IGNORECASE)
            ):  # a kernel this machine or model lacks is a config choice, not a corrupt cache
                raise ConfigError(
                    f"model.attn_implementation={self.attn_implementation!r} cannot be used "
                    f"here: {e} Use sdpa or eager, or null for transformers' default."
                ) from e
            # safetensors/config errors: name the directory and the fix
            hint = (
                f" Delete {local} and run `python scripts/prepare_models.py --force`."
                if local is not None and embedded_models.cache_root() in local.parents
                else ""
            )
            raise embedded_models.CorruptCacheError(
                f"cannot load model weights from {src!r}: {e}.{hint}"
            ) from e
        if placement.mode == "move":
            model.to(device)
        model.eval()
        if gen_config is not None:
            model.generation_config = gen_config
        model.generation_config.pad_token_id = policy.pad_token_id

        provenance: dict[str, Any] = {
            "model_id": display,
            "model_path": str(local) if local is not None else None,
            "model_class": type(model).__name__,
            "n_parameters": sum(p.numel() for p in model.parameters()),
            "weights_sha256": weights_hash(local)
            if local is not None
            else _hub_weights_hash(model),
            "tokenizer_sha256": tokenizer_hash(tok),
            "tokenizer_class": type(tok).__name__,
            "removed_chat_template_sha256": (
                hashlib.sha256(original_template.encode()).hexdigest()
                if original_template
                else None
            ),
            "dtype": dtype_name,
            "device": placement.device,
            "placement": {"mode": placement.mode, "device_map": placement.device_map},
            "attn_implementation": model.config._attn_implementation,
            "quantization": self.quantization,
            "trust_remote_code": self.trust_remote_code,
            "positive_control": self.allow_instruct_control,
            "instruct_signals": signals,
            "token_policy": {
                **{
                    k: v
                    for k, v in asdict(policy).items()
                    if k not in ("control_token_ids", "control_token_strings")
                },
                "n_control_tokens": len(policy.control_token_ids),
                "control_tokens_sample": list(policy.control_token_strings[:12]),
            },
            "package_versions": package_versions(),
        }
        provenance = json.loads(json.dumps(provenance))  # exactly what a manifest will hold
        return LoadedModel(
            model=model, tokenizer=tok, policy=policy, provenance=provenance, model_dir=local
        )


def _hub_weights_hash(model: Any) -> str:
    """Fallback when weights came through the hub cache: hash the resolved snapshot directory."""
    snap = getattr(model.config, "_name_or_path", None)
    if snap and Path(snap).is_dir():
        return weights_hash(Path(snap))
    return "unavailable"


# -- adapters ---------------------------------------------------------------------------------
ADAPTER_MANIFEST = "adapter_manifest.json"


def write_adapter_manifest(
    adapter_dir: str | Path, loaded: LoadedModel, extra: dict[str, Any] | None = None
) -> None:
    """Record which base model an adapter was trained on, next to the adapter weights."""
    from utils.jsonl_io import write_json_atomic

    write_json_atomic(
        Path(adapter_dir) / ADAPTER_MANIFEST,
        {
            "base_model_id": loaded.provenance["model_id"],
            "base_weights_sha256": loaded.provenance["weights_sha256"],
            "base_tokenizer_sha256": loaded.provenance["tokenizer_sha256"],
            **(extra or {}),
        },
    )


def adapter_hash(adapter_dir: str | Path) -> str:
    return weights_hash(Path(adapter_dir))


def attach_adapter(
    loaded: LoadedModel, adapter_dir: str | Path, adapter_name: str = "default"
) -> LoadedModel:
    """Load a LoRA adapter onto ``loaded`` after checking it was trained on these exact weights."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    manifest_path = adapter_dir / ADAPTER_MANIFEST
    if not manifest_path.exists():
        raise AdapterMismatchError(
            f"{manifest_path}: missing; cannot verify which base model the adapter belongs to"
        )
    manifest = json.loads(manifest_path.read_text())
    want, have = manifest.get("base_weights_sha256"), loaded.provenance["weights_sha256"]
    if want != have:
        raise AdapterMismatchError(
            f"adapter {adapter_dir} was trained on base model {manifest.get('base_model_id')!r} "
            f"(weights sha256 {str(want)[:12]}...), but the loaded base is "
            f"{loaded.provenance['model_id']!r} (weights sha256 {str(have)[:12]}...). "
            "Load the matching base model."
        )
    if manifest.get("base_tokenizer_sha256") not in (None, loaded.provenance["tokenizer_sha256"]):
        raise AdapterMismatchError(f"adapter {adapter_dir} was trained with a different tokenizer")
    if hasattr(loaded.model, "load_adapter") and hasattr(loaded.model, "peft_config"):
        loaded.model.load_adapter(str(adapter_dir), adapter_name=adapter_name)
        loaded.model.set_adapter(adapter_name)
    else:
        loaded.model = PeftModel.from_pretrained(
            loaded.model, str(adapter_dir), adapter_name=adapter_name
        )
    loaded.model.eval()
    loaded.adapters.append(str(adapter_dir))
    return loaded
