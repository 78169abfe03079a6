"""Generation throughput, measured in ONE run on the same model and prompts:

- the machine's fp32 matmul GFLOP/s (the compute ceiling),
- a plain one-prompt-at-a-time ``model.generate`` loop,
- the project's batched engine (utils/generation.py) at several batch sizes,
- at the largest batch size, transformers' ``generate`` against the engine's shrinking loop
  (finished rows leave the batch), both stopping on the evaluation's stop strings,

then tokens/s, the ratio to the plain loop, the fraction of the matmul ceiling reached
(2 x parameters FLOP per token) and whether greedy outputs are identical.

    python scripts/benchmark_generation.py                      # embedded Gemma-3-270M base
    python scripts/benchmark_generation.py --batch-sizes 1 8 32 64 --n-prompts 64 --plain-prompts 8
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from utils.clean_model_loader import CleanModelLoader
from utils.eval_prompts import build_eval_set
from utils.generation import DecodingConfig, generate
from utils.response_format import RESPONSE_STOP_STRINGS, format_prompt


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        torch.matmul(a, b)
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9


def plain_loop(lm, prompts: list[str], max_new_tokens: int) -> tuple[list[str], int, float]:
    """The baseline: one prompt at a time through model.generate, greedy."""
    texts, n_tok = [], 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([lm.encode(p)])
            out = lm.model.generate(
                ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=lm.policy.pad_token_id,
                eos_token_id=list(lm.policy.stop_token_ids), top_p=None, top_k=None, temperature=None,
            )  # fmt: skip
            new = out[0, ids.shape[1] :].tolist()
            stop = next((i for i, t in enumerate(new) if t in lm.policy.stop_token_ids), None)
            body = new if stop is None else new[:stop]
            n_tok += len(new) if stop is None else stop + 1
            texts.append(lm.tokenizer.decode(body, skip_special_tokens=False))
    return texts, n_tok, time.perf_counter() - t0


def vllm_beside_hf(lm, prompts: list[str], args, hf_gens) -> dict:
    """vLLM (utils/vllm_engine.py) on the same prompts, greedy, the same stop strings as the
    HF engine's shrinking-loop row it is compared with; load time kept apart."""
    from utils.vllm_engine import ENGINE_KEY, BackendConfig, VllmEngine

    engine = VllmEngine(lm, BackendConfig(backend="vllm", max_model_len=2048))
    lm.derived_cache[ENGINE_KEY] = engine
    try:
        dc = DecodingConfig(max_new_tokens=args.max_new_tokens, batch_size=max(args.batch_sizes),
                            stop_strings=RESPONSE_STOP_STRINGS)  # fmt: skip
        t0 = time.perf_counter()
        gens = generate(lm, prompts, dc, progress=True, desc="vllm")
        secs = time.perf_counter() - t0
    finally:
        del lm.derived_cache[ENGINE_KEY]
    pairs = list(zip(gens, hf_gens, strict=True))
    return {
        "load_s": engine.load_s,
        "identical": sum(a.text == b.text for a, b in pairs),
        "same_first_80_chars": sum(a.text[:80] == b.text[:80] for a, b in pairs),
        "row": {
            "mode": "vllm (load apart)",
            "batch_size": len(prompts),
            "tokens": sum(g.n_new_tokens for g in gens),
            "seconds": secs,
        },  # fmt: skip
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=None, help="model name or path (default: embedded base)")
    ap.add_argument("--n-prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32, 64])
    ap.add_argument("--plain-prompts", type=int, default=8, help="prompts timed in the plain loop")
    ap.add_argument("--json", default="runs/benchmarks/generation.json")
    ap.add_argument("--vllm", action="store_true",
                    help="also time vLLM (requirements-vllm.txt) on the same prompts")  # fmt: skip
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    gflops = matmul_gflops()
    lm = CleanModelLoader().load(args.model)
    flop_per_token = 2 * lm.provenance["n_parameters"]
    prompts = [format_prompt(r["prompt"]) for r in build_eval_set(n=args.n_prompts, seed=7)]

    plain_texts, plain_tok, plain_s = plain_loop(
        lm, prompts[: args.plain_prompts], args.max_new_tokens
    )
    rows = [{"mode": "plain loop", "batch_size": 1, "tokens": plain_tok, "seconds": plain_s}]
    identical = None
    for bs in args.batch_sizes:
        dc = DecodingConfig(max_new_tokens=args.max_new_tokens, batch_size=bs)
        t0 = time.perf_counter()
        gens = generate(lm, prompts, dc, progress=True, desc=f"engine bs={bs}")
        secs = time.perf_counter() - t0
        rows.append(
            {
                "mode": "engine",
                "batch_size": bs,
                "tokens": sum(g.n_new_tokens for g in gens),
                "seconds": secs,
            }
        )
        same = [g.raw_completion for g in gens[: args.plain_prompts]] == plain_texts
        identical = same if identical is None else identical and same
    loops = {}
    for loop in ("hf_generate", "shrinking"):
        dc = DecodingConfig(max_new_tokens=args.max_new_tokens, batch_size=max(args.batch_sizes),
                            stop_strings=RESPONSE_STOP_STRINGS, loop=loop)  # fmt: skip
        t0 = time.perf_counter()
        gens = generate(lm, prompts, dc, progress=True, desc=f"loop={loop}")
        secs = time.perf_counter() - t0
        loops[loop] = gens
        rows.append({"mode": f"stops {loop}", "batch_size": dc.batch_size,
                     "tokens": sum(g.n_new_tokens for g in gens), "seconds": secs})  # fmt: skip
    loops_identical = [g.text for g in loops["shrinking"]] == [g.text for g in loops["hf_generate"]]
    vllm_result = None
    if args.vllm:
        vllm_result = vllm_beside_hf(lm, prompts, args, loops["shrinking"])
        rows.append(vllm_result.pop("row"))
    plain_tps = plain_tok / plain_s
    for r in rows:
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        r["speedup_vs_plain"] = r["tokens_per_s"] / plain_tps
        r["fraction_of_matmul_ceiling"] = r["tokens_per_s"] * flop_per_token / (gflops * 1e9)
    best = max(rows, key=lambda r: r["tokens_per_s"])
    if vllm_result:
        shrink_row = next(r for r in rows if r["mode"] == "stops shrinking")
        vllm_result["speedup_vs_hf_engine"] = rows[-1]["tokens_per_s"] / shrink_row["tokens_per_s"]
    result = {
        "model": lm.provenance["model_id"],
        "matmul_gflops_fp32": gflops,
        "gflop_per_token": flop_per_token / 1e9,
        "ceiling_tokens_per_s": gflops * 1e9 / flop_per_token,
        "max_new_tokens": args.max_new_tokens,
        "n_prompts": len(prompts),
        "greedy_outputs_identical_to_plain_loop": identical,
        "shrinking_loop_speedup_vs_hf_generate": rows[-1]["seconds"]
        and rows[-2]["seconds"] / rows[-1]["seconds"],
        "shrinking_loop_outputs_identical_to_hf_generate": loops_identical,
        "vllm": vllm_result,
        "best_speedup_vs_plain": best["speedup_vs_plain"],
        "best_batch_size": best["batch_size"],
        "rows": rows,
        "threads": torch.get_num_threads(),
    }
    print(f"\nmatmul fp32: {gflops:.1f} GFLOP/s; {flop_per_token / 1e9:.3f} GFLOP/token; "
          f"ceiling {result['ceiling_tokens_per_s']:.0f} tok/s")  # fmt: skip
    print(
        f"{'mode':<22} {'batch':>5} {'tokens':>7} {'seconds':>8} {'tok/s':>7} {'x plain':>8} {'% ceiling':>9}"
    )
    for r in rows:
        print(
            f"{r['mode']:<22} {r['batch_size']:>5} {r['tokens']:>7} {r['seconds']:>8.1f} {r['tokens_per_s']:>7.1f} "
            f"{r['speedup_vs_plain']:>8.2f} {100 * r['fraction_of_matmul_ceiling']:>8.1f}%"
        )
    print(f"greedy outputs identical to the plain loop: {identical}")
    print(f"with stop strings: shrinking loop {result['shrinking_loop_speedup_vs_hf_generate']:.2f}x "
          f"transformers' generate, same texts: {loops_identical}")  # fmt: skip
    if vllm_result:
        print(f"vLLM: load {vllm_result['load_s']:.1f} s; {vllm_result['speedup_vs_hf_engine']:.2f}x "
              f"the HF engine without its load; greedy texts identical on "
              f"{vllm_result['identical']}/{len(prompts)}, same first 80 characters on "
              f"{vllm_result['same_first_80_chars']}/{len(prompts)}")  # fmt: skip
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
