"""Fetch, verify and convert the embedded models ahead of time (the loader also does it lazily).

python scripts/prepare_models.py                 # all three embedded assets
python scripts/prepare_models.py --only gemma-3-270m --force
"""

from __future__ import annotations

import argparse
import sys
import time

from utils import embedded_models as em


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--only", action="append", choices=sorted(em.ASSETS), help="asset(s) to prepare"
    )
    ap.add_argument("--force", action="store_true", help="re-fetch and re-convert even if cached")
    args = ap.parse_args(argv)
    names = args.only or list(em.ASSETS)
    print(f"cache: {em.cache_root()}  (override with ${em.CACHE_ENV})")
    rows = []
    for name in names:
        t0 = time.perf_counter()
        try:
            path = em.ensure_asset(name, force=args.force)
        except em.AssetError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        rows.append((name, f"{time.perf_counter() - t0:.1f}", str(path)))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'asset':<{width}}  seconds  path")
    for name, secs, path in rows:
        print(f"{name:<{width}}  {secs:>7}  {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
