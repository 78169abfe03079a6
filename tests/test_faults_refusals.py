"""Issue 14: a refused model is bad input in every preset and every stage script.

- case 'disguised instruct model under --quick': instruct-like WEIGHTS behind a base model's
  name, template and EOS pass every static check; configs/quick.yaml ran only those (mode
  static), so stage 1 wrote data. Every preset now runs at least the weight probe at load.
- case 'instruct or contaminated model': the refusal is one ``error:`` line and exit 2 (bad
  input), from a stage script and from scripts/run_pipeline.py, with nothing but a ``failed``
  manifest written.

The disguised model is a tiny Qwen2 on the real Qwen2.5 vocabulary whose weights were edited to
end a turn after a complete answer: the turn-taking instruct tuning leaves behind (the weight
probe's target), without loading SmolLM2-Instruct.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from scripts.generate_stage1_sft_data import main as stage1_main
from scripts.run_pipeline import main as pipeline_main
from scripts.train_stage1_dpo import main as dpo_main
from scripts.train_stage1_sft import main as sft_main
from tests.conftest import build_tiny_qwen, dpo_pair, make_sft_adapter
from tests.test_sft import TINY_SFT, build_tiny_bos_model, stage1_records, write_config, write_run
from utils import contamination as C
from utils.clean_model_loader import CleanModelLoader, ContaminationError
from utils.config import REPO_ROOT, load_config
from utils.jsonl_io import write_jsonl_atomic
from utils.run_context import run_configured_sentinels

PRESETS = ("cpu_default.yaml", "quick.yaml", "qwen2.5-32b_h100.yaml")
QUICK = REPO_ROOT / "configs" / "quick.yaml"


def build_disguised_instruct(out_dir: Path, tokenizer_dir: Path) -> Path:
    """A tiny Qwen2 that loads as a base model (no template, EOS <|endoftext|>, a plain name)
    but ends the turn like a chat model: every block's output projections are zeroed, so the
    last position's logits depend on the last token only, and <|im_end|>'s (tied) embedding
    points along the tokens that close the probe's complete answers ("." and "?"), never its
    unfinished ones. P(<|im_end|> | complete answer) ~0.94, ~0 after an unfinished one."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    build_tiny_qwen(out_dir, tokenizer_dir)
    tok = AutoTokenizer.from_pretrained(str(out_dir))
    weights = load_file(str(out_dir / "model.safetensors"))
    for name in weights:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            weights[name] = torch.zeros_like(weights[name])
    emb = weights["model.embed_tokens.weight"]
    closing = {tok(c, add_special_tokens=False).input_ids[-1] for _, c, _ in C.PROBE_QA}
    open_ = {tok(u, add_special_tokens=False).input_ids[-1] for _, _, u in C.PROBE_QA}
    assert closing and not closing & open_
    direction = sum(emb[t] / emb[t].pow(2).mean().sqrt() for t in closing) / emb.shape[1]
    emb[tok.convert_tokens_to_ids("<|im_end|>")] = 30.0 * direction
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tc = json.loads((out_dir / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tc))
    (out_dir / "chat_template.jinja").unlink(missing_ok=True)
    return out_dir


@pytest.fixture(scope="module")
def disguised_dir(tmp_path_factory, qwen_tokenizer_dir) -> Path:
    return build_disguised_instruct(tmp_path_factory.mktemp("m") / "plain-0.5b", qwen_tokenizer_dir)


@pytest.fixture(scope="module")
def disguised(disguised_dir):
    return CleanModelLoader().load(str(disguised_dir))


def files_under(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())


def one_error_line(err: str) -> str:
    """The single ``error:`` line of a refusal; no traceback anywhere."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def config_error(err: str) -> str:
    """A ConfigError as printed: one ``error:`` line naming the file and the count, then one
    ``  - section.key: ...`` line per problem; no traceback."""
    first = one_error_line(err)
    return "\n".join(err[err.index(first) :].splitlines())


# -- case: --quick with a disguised instruct model ------------------------------------------
def test_disguised_instruct_weights_pass_the_static_checks_alone(disguised):
    """The control: name, template, BOS and EOS say base; only the weights say chat model
    (what --quick's old `sentinels.mode: static` could not see)."""
    r = C.run_sentinel_suite(disguised, {"mode": "static"})
    assert r["verdict"] == "clean" and r["weight_probe"] is None
    assert not disguised.provenance["instruct_signals"]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_runs_the_weight_probe_at_load(preset):
    """Case '--quick runs no weight probe': every shipped recipe's load-time sentinels include
    it (mode probe, quick or full; never static or off)."""
    mode = load_config(REPO_ROOT / "configs" / preset)["sentinels"]["mode"]
    assert mode in ("probe", "quick", "full"), (preset, mode)


@pytest.mark.parametrize("preset", ["quick.yaml", "cpu_default.yaml"])
def test_quick_preset_refuses_a_disguised_instruct_model_like_the_default(preset, disguised):
    """Case '--quick with a disguised instruct model': refused at load by the weight probe, by
    --quick as by the default config."""
    sentinels = load_config(REPO_ROOT / "configs" / preset)["sentinels"]
    with pytest.raises(ContaminationError, match=r"contaminated: \['weight probe: end-of-turn"):
        run_configured_sentinels(disguised, sentinels)


def test_stage1_under_quick_refuses_a_disguised_instruct_model_with_exit_2(
    disguised_dir, tmp_path, capsys
):
    """Case '--quick with a disguised instruct model', through the stage-1 script: exit 2, one
    error line naming the model and the weight probe, no data written (only the failed
    manifest)."""
    out = tmp_path / "stage1"
    rc = stage1_main(["--config", str(QUICK), "--set", f"model.name={disguised_dir}",
                      "--out", str(out), "--no-progress"])  # fmt: skip
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2
    assert str(disguised_dir) in line and "weight probe: end-of-turn score" in line
    assert files_under(out) == ["manifest.json"]
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "failed" and m["exit_code"] == 2


# -- case: an instruct or contaminated model is bad input, from every stage --------------------
@pytest.fixture(scope="module")
def instruct_named_dir(tmp_path_factory) -> Path:
    """The tiny Llama under a name that says instruct (the loader refuses it by name)."""
    src = build_tiny_bos_model(tmp_path_factory.mktemp("b") / "tiny-llama")
    return Path(shutil.copytree(src, src.parent / "tiny-llama-instruct"))


def test_stage1_refuses_an_instruct_model_with_one_line_and_exit_2(
    instruct_named_dir, tmp_path, capsys
):
    """Case 'model.name=<an instruct model>' through the stage-1 script (StageRun's loader)."""
    out = tmp_path / "stage1"
    rc = stage1_main(["--config", str(QUICK), "--set", f"model.name={instruct_named_dir}",
                      "--out", str(out), "--no-progress"])  # fmt: skip
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and "looks instruction-tuned" in line and "tiny-llama-instruct" in line
    assert files_under(out) == ["manifest.json"]


def test_sft_refuses_an_instruct_model_with_one_line_and_exit_2(
    instruct_named_dir, tmp_path, capsys
):
    """Case 'model.name=<an instruct model>' through the SFT script (its own loader call): the
    training data is read, nothing is trained or written but the failed manifest."""
    run = write_run(tmp_path / "run", stage1_records(4))
    cfg = write_config(tmp_path / "cfg.yaml", instruct_named_dir, {**TINY_SFT, "dev_fraction": 0.0})
    before = files_under(run)
    rc = sft_main(["--config", str(cfg), "--run-dir", str(run)])
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and "looks instruction-tuned" in line
    assert files_under(run) == sorted([*before, "sft/manifest.json"])


def test_dpo_refuses_an_instruct_model_with_one_line_and_exit_2(
    instruct_named_dir, tmp_path, capsys
):
    """Case 'model.name=<an instruct model>' through the DPO script."""
    run = tmp_path / "run"
    write_jsonl_atomic(run / "pairs" / "pairs.jsonl", [dpo_pair(i) for i in range(4)])
    make_sft_adapter(instruct_named_dir.parent / "tiny-llama", run / "sft" / "adapter")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps({"model": {"name": str(instruct_named_dir)},
                               "dpo": {"max_steps": 1, "max_length": 256}}))  # fmt: skip
    before = files_under(run)
    rc = dpo_main(["--config", str(cfg), "--run-dir", str(run)])
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and "looks instruction-tuned" in line
    assert files_under(run) == sorted([*before, "dpo/manifest.json"])


def test_pipeline_passes_a_stage_refusal_on_as_exit_2(instruct_named_dir, tmp_path, capsys):
    """Case 'model.name=<an instruct model>' through scripts/run_pipeline.py --quick: the first
    stage refuses it, the pipeline stops there with exit 2 (bad input, not 1, a crash), shows
    the stage's error line, and no stage after it ran. (The sentinels' refusal of a
    contaminated model is the same exit 2 from the stage: the stage-1 test above.)"""
    run = tmp_path / "run"
    rc = pipeline_main(["--quick", "--skip-preflight", "--run", str(run),
                        "--set", f"model.name={instruct_named_dir}"])  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 2, out + err
    assert "Traceback" not in out + err
    assert "error: " in err and "looks instruction-tuned" in err
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == ["stage1"]
    assert files_under(run / "stage1") == ["manifest.json"]
    assert json.loads((run / "stage1" / "manifest.json").read_text())["exit_code"] == 2


def test_pipeline_refuses_a_bad_config_value_before_any_stage(tmp_path, capsys):
    """Case '--set eval.n_prompts=abc' (and sft.max_steps=-3) through scripts/run_pipeline.py:
    exit 2 naming both keys, before preflight or any stage; the run directory is not created."""
    run = tmp_path / "run"
    rc = pipeline_main(["--quick", "--run", str(run), "--set", "eval.n_prompts=abc",
                        "--set", "sft.max_steps=-3"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "eval.n_prompts: expected an integer, got 'abc'" in err
    assert "sft.max_steps: must be -1 (no cap) or >= 1, got -3" in err
    assert not run.exists()


# -- case: a bad config value given to a stage script run alone --------------------------------
NO_BAR = "--no-progress"
STAGE_SCRIPTS = {  # script -> (its arguments for a run directory, where it writes)
    "generate_stage1_sft_data": (lambda run: ["--out", str(run / "stage1"), NO_BAR], "stage1"),
    "sample_verified": (lambda run: ["--run", str(run), "--round", "1", NO_BAR], "verified_r1"),
    "generate_preference_pairs": (lambda run: ["--run", str(run), NO_BAR], "pairs"),
    "generate_cai_pairs": (lambda run: ["--run", str(run), NO_BAR], "cai_pairs"),
    "train_stage1_sft": (lambda run: ["--run-dir", str(run)], "sft"),
    "train_stage1_dpo": (lambda run: ["--run-dir", str(run)], "dpo"),
    "evaluate_capability_differentiation": (lambda run: ["--run", str(run), NO_BAR], "eval"),
}


@pytest.mark.parametrize(
    ("script", "override", "message"),
    [
        ("train_stage1_sft", "sft.max_steps=-3", "sft.max_steps: must be -1 (no cap) or >= 1, got -3"),
        ("generate_stage1_sft_data", "stage1.n_train=abc", "stage1.n_train: expected an integer, got 'abc'"),
        ("generate_preference_pairs", "pairs.num_candidates=abc", "pairs.num_candidates: expected an integer, got 'abc'"),
        ("sample_verified", "verified.num_candidates=abc", "verified.num_candidates: expected an integer, got 'abc'"),
        ("generate_cai_pairs", "cai.top_p=0", "cai.top_p: must be in (0, 1], got 0"),
        ("train_stage1_dpo", "dpo.learning_rate=0", "dpo.learning_rate: must be > 0, got 0"),
        ("evaluate_capability_differentiation", "eval.n_prompts=abc", "eval.n_prompts: expected an integer, got 'abc'"),
        ("generate_stage1_sft_data", "sentinels.top_p=2", "sentinels.top_p: must be in (0, 1], got 2"),
    ],
)  # fmt: skip
def test_a_stage_script_run_alone_refuses_a_bad_value_in_what_it_reads(
    script, override, message, tmp_path, capsys
):
    """Cases '--set sft.max_steps=-3' (it trained with no cap), 'stage1.n_train=abc' (a
    TypeError traceback after the model loaded) and the like, given to the stage script
    itself rather than the pipeline: the same rules, exit 2 with one line naming the key,
    before any model or data is read; only the failed manifest is written."""
    import importlib

    args, out = STAGE_SCRIPTS[script]
    run = tmp_path / "run"
    write_jsonl_atomic(run / "pairs" / "pairs.jsonl", [dpo_pair(0)])  # DPO reads it first
    before = files_under(run)
    main = importlib.import_module(f"scripts.{script}").main
    nowhere = f"model.name={tmp_path / 'no-model'}"  # never a real model, fixed or not
    rc = main(["--config", str(QUICK), *args(run), "--set", nowhere, "--set", override])
    text = config_error(capsys.readouterr().err)
    assert rc == 2 and f"quick.yaml: 1 problem(s):\n  - {message}" in text, text
    assert files_under(run) == sorted([*before, f"{out}/manifest.json"])
    assert json.loads((run / out / "manifest.json").read_text())["exit_code"] == 2


@pytest.mark.parametrize("value", ["off", "false", "null", "'off'"])
def test_sentinels_mode_off_is_a_valid_recipe_value(value):
    """Case '--set sentinels.mode=off' (the recipes list it; YAML reads a bare off as false):
    the up-front validation refused it ("sentinels.mode: expected a string, got False"), so
    the pipeline would not start. It is valid, no sentinel runs, and the suite itself refuses
    to run 'off'; a misspelt mode is still named."""
    from utils.config_validation import validate_config

    cfg = load_config(QUICK, [f"sentinels.mode={value}"])
    assert validate_config(cfg) == []
    assert C.SentinelConfig.from_dict(cfg["sentinels"]).mode == "off"
    # off never looks at the model
    assert run_configured_sentinels(None, cfg["sentinels"]) == {"mode": "off", "verdict": "not run"}
    with pytest.raises(ValueError, match="off"):
        C.run_sentinel_suite(None, cfg["sentinels"])
    # (the closing quote of 'of' was cut off by the validator: a message ending in a repr)
    assert validate_config(load_config(QUICK, ["sentinels.mode=of"])) == [
        "sentinels.mode must be one of ('off', 'static', 'probe', 'quick', 'full'), got 'of'"
    ]
