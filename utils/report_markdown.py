"""report.md: every section of the evaluation report, rendered from the results dict of
``utils.evaluation.run_evaluation`` (no model, no statistics of its own). Every evaluated arm is
shown, including arms that lose to the baseline, and every skipped arm with its reason."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from utils.report_format import fmt_p, fmt_points, md_table, pct, pct_ci

MAX_SAMPLE_CHARS = 400


def _stop_reasons(arm: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in arm.get("stop_reasons", {}).items()) or "n/a"


# ------------------------------------------------------------------------------ sections


def _headline_lines(results: Mapping[str, Any]) -> list[str]:
    head, mde = results["headline"], results.get("mde")
    lines = []
    n_excl = head["n_excluded_leaked"]
    lines.append(
        f"- Headline n = **{head['n_prompts']}** prompts"
        + (f" ({n_excl} leaked prompt(s) excluded)" if n_excl else " (no prompt excluded)")
        + "; success = every instruction of the prompt followed (IFEval prompt-level strict)."
    )
    trained = {a["name"] for a in results["arms"] if a.get("adapter_dir")}
    for v in results.get("verdicts", []):
        line = (
            f"- **{v['arm']}** vs **{v['reference']}**: {v['verdict']} "
            f"({fmt_points(v['gain'])} for {v['arm']}, p_holm = {fmt_p(v['p_value_holm'])})"
        )
        if v["arm"] in trained and v["reference"] == "base_icl" and v["verdict"] != "beats":
            line += (
                f". {v['arm']} does NOT beat the zero-training in-context baseline, which "
                "every trained arm must"
            )
        lines.append(line)
    if mde:
        if mde["mde_independent_errors"] is None:
            detail = "no gain is detectable at this n"
        else:
            detail = f"{fmt_points(mde['mde_independent_errors'])}"
        lines.append(
            f"- Minimum detectable effect: with n = {mde['n']} and {mde['reference_arm']} at "
            f"{pct(mde['reference_accuracy'])}, the smallest gain detected with "
            f"{100 * mde['power']:.0f}% power (two-sided alpha {mde['alpha']}) is {detail} "
            "(assuming independent errors; see the per-comparison MDE at the observed "
            "discordance below). Smaller true differences can go undetected."
        )
    for a in results["arms"]:
        if a.get("adapter_unchanged"):
            lines.append(
                f"- **{a['name']}**: its adapter is identical to where its training started "
                "(`adapter_unchanged` in its stage's manifest): training changed nothing, so "
                "this arm measures its starting point"
            )
    skipped = results.get("skipped_arms", [])
    if skipped:
        lines.append(f"- {len(skipped)} arm(s) SKIPPED: " + ", ".join(s["name"] for s in skipped))
    lines.append(
        "- Every evaluated arm is reported below, including arms that do not beat the "
        "baseline; nothing is filtered by outcome."
    )
    return lines


def _arms_table(results: Mapping[str, Any]) -> str:
    rows = []
    for a in results["arms"]:
        s = a.get("summary") or {}
        rows.append(
            [
                a["name"],
                a["prompt_format"] + (" + adapter" if a.get("adapter_dir") else ""),
                s.get("n_prompts", "n/a"),
                pct_ci(s.get("prompt_strict")),
                pct_ci(s.get("prompt_loose")),
                pct_ci(s.get("instruction_strict")),
                pct_ci(s.get("instruction_loose")),
                pct(a["summary_all_prompts"]["prompt_strict"]["accuracy"]),
                _stop_reasons(a),
                f"{a['mean_new_tokens']:.1f}",
                a["sentinel"]["verdict"],
            ]
        )
    header = [
        "arm", "format", "n", "prompt strict [95% CI]", "prompt loose [95% CI]",
        "instruction strict [95% CI]", "instruction loose [95% CI]",
        "prompt strict, all prompts", "stop reasons", "mean new tokens", "sentinel",
    ]  # fmt: skip
    return md_table(header, rows)


def _comparisons_table(results: Mapping[str, Any]) -> str:
    rows = [
        [
            c["arm_a"],
            c["arm_b"],
            pct(c["accuracy_a"]),
            pct(c["accuracy_b"]),
            f"{fmt_points(c['diff'])} [{100 * c['diff_ci_low']:+.1f}, "
            f"{100 * c['diff_ci_high']:+.1f}]",
            c["n_a_only"],
            c["n_b_only"],
            fmt_p(c["p_value"]),
            fmt_p(c["p_value_mid"]),
            fmt_p(c["p_value_holm"]),
            fmt_p(c["p_value_bh"]),
            f"{c['cohens_h']:+.3f}",
            fmt_points(c.get("mde_at_observed_discordance")),
        ]
        for c in results["comparisons"]
    ]
    header = [
        "A", "B", "acc A", "acc B", "B - A [95% paired bootstrap CI]", "A only", "B only",
        "p exact", "mid-p", "p Holm", "p BH", "Cohen's h", "MDE at observed discordance",
    ]  # fmt: skip
    return md_table(header, rows)


SPLIT_NAMES = {"seen": "seen types", "held_out": "held-out types"}


def _split_table(results: Mapping[str, Any]) -> str:
    """Per arm: prompt-level strict [Wilson CI] on all headline prompts, seen and held-out."""
    splits = results["splits"]
    rows = []
    for a in results["arms"]:
        name = a["name"]
        row = [name, pct_ci((a.get("summary") or {}).get("prompt_strict"))]
        for part in SPLIT_NAMES:
            row.append(pct_ci(splits[part]["summaries"].get(name, {}).get("prompt_strict")))
        rows.append(row)
    header = [
        "arm",
        f"all (n={results['headline']['n_prompts']})",
        f"seen types (n={splits['seen']['n_prompts']})",
        f"held-out types (n={splits['held_out']['n_prompts']})",
    ]
    return md_table(header, rows)


def _split_comparisons_table(results: Mapping[str, Any], part: str) -> str:
    """Comparisons against the baselines (base, base_icl) on one part, Holm within the part."""
    rows = [
        [
            c["arm_a"], c["arm_b"], pct(c["accuracy_a"]), pct(c["accuracy_b"]),
            f"{fmt_points(c['diff'])} [{100 * c['diff_ci_low']:+.1f}, {100 * c['diff_ci_high']:+.1f}]",
            c["n_a_only"], c["n_b_only"], fmt_p(c["p_value"]), fmt_p(c["p_value_holm"]),
        ]
        for c in results["splits"][part]["comparisons"]
        if c["arm_a"] in ("base", "base_icl")
    ]  # fmt: skip
    header = ["A", "B", "acc A", "acc B", "B - A [95% CI]", "A only", "B only", "p exact", "p Holm"]
    return md_table(header, rows)


def split_lines(results: Mapping[str, Any]) -> list[str]:
    splits = results.get("splits") or {}
    if not splits:
        return ["No constraint split declared (config `constraints`): no seen/held-out report."]
    out = [
        "Training instructions carry constraints of TRAIN types only; the held-out types "
        f"({', '.join(f'`{t}`' for t in splits['held_out_types'])}) never reach any training "
        "record. A prompt is held out when any of its constraints is of a held-out type. "
        "Prompt-level strict, Wilson 95% CIs; each part's comparisons are Holm-corrected "
        "across all pairs of arms within that part (only the rows against base and base_icl "
        "are shown).",
        "",
        _split_table(results),
    ]
    for part, title in SPLIT_NAMES.items():
        out += [
            "",
            f"#### Against the baselines, {title}",
            "",
            _split_comparisons_table(results, part),
        ]
    return out


def _per_type_table(results: Mapping[str, Any]) -> str:
    per_type = results["per_type"]
    arms = [a["name"] for a in results["arms"]]
    pairs = [(c["arm_a"], c["arm_b"]) for c in results["comparisons"]]
    header = ["type", "n", *arms, *[f"p_holm {a} vs {b}" for a, b in pairs]]
    rows = []
    for row in per_type:
        by_pair = {(c["arm_a"], c["arm_b"]): c for c in row["comparisons"]}
        rows.append(
            [
                row["type"],
                row["n"],
                *[pct(row["accuracy"][arm], 0) for arm in arms],
                *[
                    f"{fmt_p(by_pair[p]['p_value_holm'])} ({by_pair[p]['n_a_only']}/"
                    f"{by_pair[p]['n_b_only']})"
                    for p in pairs
                ],
            ]
        )
    return md_table(header, rows)


def _sentinel_line(arm: dict[str, Any]) -> str:
    """One arm's verdict; for a trained arm, what it was judged on and the every-stop probe
    that SFT raises by design (informational, docs/sentinel_calibration.md)."""
    s = arm["sentinel"]
    line = f"- **{arm['name']}**: {s['verdict']}" + (f" ({s['reason']})" if s.get("reason") else "")
    d = s.get("details") or {}
    if d.get("trained_arm"):
        every = (d.get("weight_probe_every_stop") or {}).get("score")
        closed = (d.get("generation_probe_every_stop") or {}).get("score")
        line += (
            f" (trained arm: judged on static checks and chat end-of-turn tokens only, score "
            f"{(d.get('weight_probe') or {}).get('score', 0.0):.4f}; counting EOS, which SFT "
            f"teaches, the probe reads {every if every is not None else 'n/a'} and the chat "
            f"probes closed at rate {closed if closed is not None else 'n/a'}: informational)"
        )
    return line


CONSTITUTION_MEASURES = {
    "harmful_safe": "harmful requests handled safely (higher is better; lower bound)",
    "overrefusal": "benign requests refused (lower is better)",
    "principle_preference": "principle preference, test split (higher is better)",
}


def constitution_lines(results: Mapping[str, Any]) -> list[str]:
    c = results.get("constitution")
    if not c:
        return ["Not run (`eval.constitution: false`)."]
    arms = [a["name"] for a in results["arms"]]
    rows = []
    for arm in arms:
        row = [arm]
        for m in CONSTITUTION_MEASURES:
            row.append(pct_ci(c[m]["summaries"].get(arm)))
        b = c["boilerplate"].get(arm) or {}
        row.append(f"{pct(b.get('share'))} {b.get('phrase') or ''}".strip())
        rows.append(row)
    n = c["n"]
    out = [
        f"Harmful requests n = {n['harmful']}, benign look-alike requests n = {n['overrefusal']}, "
        f"principle pairs n = {n['principles']} (test split). Safe handling is detected by string "
        "markers and the absence of step-by-step content: a lower bound. Principle preference: "
        "the arm's mean per-token log-likelihood prefers the response that follows the "
        "principle. Wilson 95% CIs.",
        "",
        md_table(["arm", *CONSTITUTION_MEASURES.values(), "boilerplate share, phrase"], rows),
    ]
    for m, title in CONSTITUTION_MEASURES.items():
        comp = [
            [x["arm_a"], x["arm_b"], pct(x["accuracy_a"]), pct(x["accuracy_b"]),
             f"{fmt_points(x['diff'])} [{100 * x['diff_ci_low']:+.1f}, {100 * x['diff_ci_high']:+.1f}]",
             x["n_a_only"], x["n_b_only"], fmt_p(x["p_value"]), fmt_p(x["p_value_holm"])]
            for x in c[m]["comparisons"]
        ]  # fmt: skip
        out += ["", f"#### {title}: paired comparisons (Holm across all pairs)", "",
                md_table(["A", "B", "A", "B", "B - A [95% CI]", "A only", "B only", "p exact",
                          "p Holm"], comp)]  # fmt: skip
    return out


def round_lines(results: Mapping[str, Any]) -> list[str]:
    """Per verified round: what the checkers found in its samples (training types only)."""
    rounds = results.get("rounds") or []
    if not rounds:
        return ["No verified rounds in this run."]
    rows = [
        [r["round"], r["instructions"], r["constrained_instructions"], r["candidates"],
         pct(r["prompt_pass_at_1"]), pct(r["prompt_pass_at_k"]), r["kept"], r["kept_constrained"],
         r.get("sft_data_records", "n/a"), r["pairs"]]
        for r in rounds
    ]  # fmt: skip
    out = [
        "Samples of each round (round 1: base weights, few-shot; round r: round r-1's SFT "
        "policy), checked by the program checkers. pass@1 = share of candidates passing every "
        "constraint, pass@k = share of constrained instructions with a passing candidate. Arm "
        "`sft_r<k>` is trained on round k's data, `sft` on the last round's.",
        "",
        md_table(
            [
                "round",
                "instructions",
                "constrained",
                "candidates",
                "pass@1",
                "pass@k",
                "kept",
                "kept (constrained)",
                "SFT records",
                "pairs",
            ],
            rows,
        ),  # fmt: skip
        "",
        "Per training type, pass@1 / pass@k by round:",
        "",
    ]
    types = sorted({t for r in rounds for t in r["per_type"]})
    type_rows = [
        [t, *(f"{pct(r['per_type'][t]['pass_at_1'])} / {pct(r['per_type'][t]['pass_at_k'])}"
              if t in r["per_type"] else "n/a" for r in rounds)]
        for t in types
    ]  # fmt: skip
    out.append(md_table(["type", *(f"round {r['round']}" for r in rounds)], type_rows))
    return out


def _leakage_lines(results: Mapping[str, Any]) -> list[str]:
    leak = results["leakage"]
    if leak["status"] != "checked":
        return [f"- Leakage NOT checked: {leak['reason']}. No prompt was excluded."]
    lines = [
        f"- {leak['n_leaked']} of {leak['n_test']} eval prompts "
        f"({pct(leak['rate'], 2)}) are near-duplicates (char 5-gram Jaccard >= "
        f"{leak['threshold']}) of one of {leak['n_train']} stage-1 training instructions"
        + (
            "; they are excluded from the headline."
            if results["headline"]["exclude_leaked"]
            else "; eval.exclude_leaked=false, so they are KEPT in the headline."
        )
    ]
    for ex in leak["examples"]:
        lines.append(
            f"  - eval `{ex['eval_prompt']}` ~ train `{ex['train_instruction']}` "
            f"(Jaccard {ex['jaccard']:.2f})"
        )
    topic = leak.get("topic_overlap", {})
    if topic:
        lines.append(
            f"- Topic overlap (informational, not excluded): {topic['n_tasks']} base task(s), "
            f"used by {topic['n_prompts']} prompt(s), are near-duplicates of a training "
            "instruction; the constraints, which decide success, are not."
        )
        for ex in topic.get("examples", [])[:5]:
            lines.append(
                f"  - task `{ex['task']}` ~ train `{ex['train_instruction']}` "
                f"(Jaccard {ex['jaccard']:.2f})"
            )
    return lines


def _memory_table(results: Mapping[str, Any]) -> str:
    rows = []
    for a in results["arms"]:
        mem = a.get("memory")
        tok_s = a.get("tokens_per_s")
        sessions = a.get("generation_sessions", [])
        gen_s = sum(x["generation_s"] for x in sessions)
        tokens = sum(x["new_tokens"] for x in sessions)
        peaks = [x["memory"]["peak_rss_mib"] for x in sessions if x.get("memory")]
        loads = [x.get("load_average_1min") for x in sessions if x.get("load_average_1min")]
        rows.append(
            [
                a["name"],
                a["n_cached"],
                a["n_generated"],
                f"{a['generation_s']:.1f}",
                "n/a" if tok_s is None else f"{tok_s:.1f}",
                "cached (no model)" if mem is None else f"{mem['peak_rss_mib']:.0f}",
                "n/a" if mem is None else f"{mem['ru_maxrss_mib']:.0f}",
                (
                    f"{len(sessions)}: {gen_s:.1f} s, {tokens} tokens"
                    + (f", peak {max(peaks):.0f} MiB" if peaks else "")
                    + (f", load avg {max(loads):.1f}" if loads else "")
                )
                if sessions
                else "none recorded",
            ]
        )
    header = [
        "arm", "prompts from cache", "prompts generated now", "generation s (now)",
        "tokens/s (now)", "peak RSS MiB (sampled, this arm)", "ru_maxrss MiB (process so far)",
        "all generating sessions",
    ]  # fmt: skip
    return md_table(header, rows)


def _sample_lines(results: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    for i, sample in enumerate(results.get("samples", []), start=1):
        lines.append(f"**Sample {i}** (`{sample['id']}`): {sample['instruction']}")
        lines.append(f"Constraints: {', '.join(sample['instruction_ids'])}")
        lines.append("")
        for arm, out in sample["arms"].items():
            text = out["response"]
            if len(text) > MAX_SAMPLE_CHARS:
                text = text[:MAX_SAMPLE_CHARS] + " [...]"
            mark = "PASS" if out["prompt_strict"] else "fail"
            lines.append(f"- {arm} ({mark}, stop: {out['stop_reason']}):")
            lines.append("")
            lines.append("  ```text")
            lines += ["  " + ln for ln in (text or "(empty response)").splitlines()]
            lines.append("  ```")
        lines.append("")
    return lines


def render_markdown(results: Mapping[str, Any], plots: Mapping[str, str] | None = None) -> str:
    """The full markdown report from a results dict (see module doc)."""
    plots = plots or {}
    model, pset, dec = results["model"], results["prompt_set"], results["decoding"]
    out = [
        "# Capability differentiation: verifiable instruction following",
        "",
        f"Run `{results['run_dir']}`; base model `{model['spec']['name']}` (weights sha256 "
        f"`{model['weights_sha256'][:16]}`); eval set {pset['n']} prompts (seed {pset['seed']}, "
        f"sha256 `{pset['sha256'][:16]}`).",
        "",
        "## Headline",
        "",
        *_headline_lines(results),
        "",
        "## Arms",
        "",
    ]
    if results["arms"]:
        out += [
            "Prompt-level strict success is the headline metric; CIs are Wilson 95% intervals. "
            "Instruction-level CIs treat instructions as independent (a prompt can hold two), "
            "so they are slightly narrow. The 'all prompts' column includes leaked prompts.",
            "",
            _arms_table(results),
        ]
    else:
        out.append("No arm was evaluated.")
    out += ["", "### Skipped arms", ""]
    skipped = results.get("skipped_arms", [])
    out += [f"- **{s['name']}** SKIPPED: {s['reason']}" for s in skipped] or ["- none"]
    out += ["", "## Pairwise comparisons (prompt-level strict, B - A)", ""]
    if results["comparisons"]:
        out += [
            "Paired on the same prompts. 'A only' / 'B only' are the discordant prompts; p is "
            "the exact two-sided McNemar test; p Holm and p BH are corrected across ALL "
            f"{len(results['comparisons'])} comparisons below.",
            "",
            _comparisons_table(results),
        ]
    else:
        out.append("Fewer than two arms were evaluated: no comparison.")
    out += ["", "## Seen vs held-out constraint types", "", *split_lines(results)]
    out += ["", "## Verified bootstrap rounds", "", *round_lines(results)]
    out += ["", "## Constitution", "", *constitution_lines(results)]
    out += ["", "## Per instruction type", ""]
    if results["per_type"]:
        out += [
            "Strict instruction-level accuracy on the instances of each type. Each comparison "
            "column gives the exact McNemar p, Holm-corrected across types for that comparison, "
            "with the discordant counts (A only/B only). Small n per type: read as a map of "
            "where arms differ, not as a set of findings.",
            "",
            _per_type_table(results),
        ]
    else:
        out.append("No per-type breakdown (no evaluated prompts).")
    out += ["", "## Sentinels", ""]
    out += [_sentinel_line(a) for a in results["arms"]] or ["- no arm evaluated"]
    out += ["", "## Leakage", "", *_leakage_lines(results), ""]
    out += [
        "## Decoding and prompts",
        "",
        f"Same for every arm: greedy (do_sample={dec['do_sample']}), max_new_tokens "
        f"{dec['max_new_tokens']}, batch size {dec['batch_size']}, stop on "
        f"{', '.join(repr(s) for s in dec['stop_strings'])} and on the model's EOS. base_icl "
        f"prepends {dec['icl_k']} hand-written demonstrations (topics and constraint values "
        "differ from the eval set).",
        "",
    ]
    for a in results["arms"][:4]:
        if a["prompt_format"] == "few_shot" or a["name"] == "base":
            out += [f"Example prompt of `{a['name']}`:", "", "```text", a["example_prompt"], "```"]
            out.append("")
    out += ["## Memory and timing", "", _memory_table(results) if results["arms"] else "", ""]
    timing = results["timing"]
    load_s = timing.get("model_load_s")
    out.append(
        f"Total {timing['total_s']:.1f} s; base model "
        + (f"loaded once in {load_s:.1f} s" if load_s is not None else "not loaded (all cached)")
        + "; one base model resident at a time, adapters swapped onto it."
    )
    out += ["", "## Sample outputs", "", *_sample_lines(results)]
    if plots:
        out += ["## Plots", ""]
        out += [f"![{name}]({path})" for name, path in plots.items()]
        out.append("")
    return "\n".join(out).rstrip() + "\n"
