"""Likelihood scoring on the HF path against vLLM's prompt_logprobs (``generation.scoring``), in
ONE run on the same model and texts (issue 16, item 4):

- summed log P(response | prompt) of the 65 (instruction, response) pairs in
  utils/data/response_examples.jsonl, formatted as the pmi judge and the evaluation score them;
- log P(end token | prompt) for every end-of-turn/EOS token of the model after the same 65
  prompts (``next_token_logprobs``, what the sentinels' weight probe reads), and the weight
  probe's score on both paths;

then the maximum and mean |difference| in nats, the largest per token, both paths' times and
vLLM's start-up. Needs vllm (requirements-vllm.txt); the ``__main__`` guard is required because
vLLM starts its engine in a child process.

    python scripts/compare_scoring_backends.py                  # embedded Gemma-3-270M base
    python scripts/compare_scoring_backends.py --model /path/to/model --json out.json
"""

from __future__ import annotations

import argparse
import time

from utils.clean_model_loader import CleanModelLoader
from utils.completion_prompts import load_response_examples
from utils.contamination import end_token_ids, weight_probe
from utils.jsonl_io import write_json_atomic
from utils.response_format import format_completion, format_prompt
from utils.scoring import completion_logprobs, next_token_logprobs
from utils.vllm_engine import attach_backend
from utils.vllm_scoring import logprob_differences


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def both_paths(lm, prefixes, completions, end_ids, batch_size) -> dict:
    """Scores on whichever path is attached to ``lm`` now, each timed."""
    scored, s1 = timed(completion_logprobs, lm, prefixes, completions, batch_size=batch_size)
    nxt, s2 = timed(next_token_logprobs, lm, prefixes, end_ids, allow_control_tokens=True)
    probe, s3 = timed(weight_probe, lm)
    return {"completion": scored, "next": nxt.flatten().tolist(), "probe": probe["score"],
            "seconds": {"completion": s1, "next_token": s2, "weight_probe": s3}}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=None, help="model name or path (default: embedded base)")
    ap.add_argument("--batch-size", type=int, default=8, help="HF scoring batch size")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--json", default="runs/benchmarks/scoring_backends.json")
    args = ap.parse_args(argv)

    lm = CleanModelLoader().load(args.model)
    examples = load_response_examples()
    prefixes = [format_prompt(e["instruction"]) for e in examples]
    completions = [format_completion(e["response"]) for e in examples]

    end_ids = sorted(set(end_token_ids(lm).values()))
    hf = both_paths(lm, prefixes, completions, end_ids, args.batch_size)
    info = attach_backend(lm, {"backend": "vllm", "scoring": "vllm",
                               "max_model_len": args.max_model_len})  # fmt: skip
    vl = both_paths(lm, prefixes, completions, end_ids, args.batch_size)
    result = {
        "model": lm.provenance["model_id"],
        "dtype": str(next(lm.model.parameters()).dtype),
        "completion_logprobs": logprob_differences(hf["completion"], vl["completion"]),
        "next_token_logprobs": {
            "end_tokens": end_ids,
            "n_logprobs": len(hf["next"]),
            "max_abs_diff_nats": max(
                abs(a - b) for a, b in zip(hf["next"], vl["next"], strict=True)
            ),
        },
        "weight_probe_score": {"hf": hf["probe"], "vllm": vl["probe"]},
        "seconds": {"hf": hf["seconds"], "vllm": vl["seconds"]},
        "vllm": info,
    }
    c, n = result["completion_logprobs"], result["next_token_logprobs"]
    print(f"summed log-prob of {c['n_texts']} responses ({c['n_tokens']} tokens): max |HF - vLLM| "
          f"{c['max_abs_diff_nats']:.2e} nats (mean {c['mean_abs_diff_nats']:.2e}, per token "
          f"{c['max_abs_diff_per_token_nats']:.2e})")  # fmt: skip
    print(f"next-token log P of {len(end_ids)} end tokens after {len(prefixes)} prompts: max "
          f"|HF - vLLM| {n['max_abs_diff_nats']:.2e} nats; weight probe score HF "
          f"{hf['probe']:.6f}, vLLM {vl['probe']:.6f}")  # fmt: skip
    for path in ("hf", "vllm"):
        t = result["seconds"][path]
        print(f"{path:>4}: completion {t['completion']:.1f} s, next-token {t['next_token']:.1f} s, "
              f"weight probe {t['weight_probe']:.1f} s")  # fmt: skip
    print(f"vLLM start-up {info['load_s']:.1f} s")
    write_json_atomic(args.json, result)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
