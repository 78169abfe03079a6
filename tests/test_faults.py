"""Faults that used to pass silently or late (issue 14, items 1, 6, 8, 9, 10), one test each:

- a half-written ``checkpoint-N/`` (kill or full disk during the save) is moved aside and the
  last complete checkpoint resumed (real TRL runs on the tiny Qwen, 2-3 steps);
- training that changed nothing (learning rate 0) is flagged in the manifest (SFT and DPO);
- an adapter of another shape with a copied manifest is refused before any generation;
- bad config values are all reported at once, each naming its ``section.key``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from scripts.train_stage1_dpo import main as dpo_main
from scripts.train_stage1_sft import main as sft_main
from tests.conftest import dpo_pair
from tests.test_sft import (
    TINY_SFT,
    build_tiny_bos_model,
    stage1_records,
    write_config,
    write_run,
)
from utils import eval_cache, evaluation
from utils.adapter_shapes import BaseShapes, adapter_shape_problem
from utils.checkpoints import AdapterUnchangedWarning, checkpoint_problem
from utils.config import DEFAULT_CONFIG, REPO_ROOT, ConfigError, load_config
from utils.config_validation import check_config, validate_config
from utils.eval_config import EvalConfig, EvalInputError, ModelSpec
from utils.evaluation import run_evaluation


def tree_digest(d: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``d``."""
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# The training runs use the tiny Llama on a 300-token vocabulary: TRL's dataset fingerprint
# pickles the tokenizer, ~11 s per trainer with the 151k Qwen vocabulary, well under 1 s here.
SMALL_SFT = {**TINY_SFT, "dev_fraction": 0.0, "max_length": 256}


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory) -> Path:
    return build_tiny_bos_model(tmp_path_factory.mktemp("tiny-llama-base"))


# -- 1. incomplete checkpoints ---------------------------------------------------------------
@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, small_model_dir):
    """A real 2-step SFT run that saved checkpoint-1 and checkpoint-2 (kept as a template)."""
    root = tmp_path_factory.mktemp("faults-sft")
    run = write_run(root / "run", stage1_records(16))
    cfg = write_config(root / "cfg.yaml", small_model_dir, {**SMALL_SFT, "save_total_limit": 3})
    assert sft_main(["--config", str(cfg), "--run-dir", str(run)]) == 0
    ckpts = run / "sft" / "checkpoints"
    assert (ckpts / "checkpoint-1").is_dir() and (ckpts / "checkpoint-2").is_dir()
    return root


def copy_run(template: Path, dest: Path) -> tuple[Path, Path, Path]:
    """(run dir, config, checkpoints dir) of a private copy of the template run."""
    shutil.copytree(template, dest)
    return dest / "run", dest / "cfg.yaml", dest / "run" / "sft" / "checkpoints"


CORRUPTIONS = {
    "trainer_state_missing": (
        lambda c: (c / "trainer_state.json").unlink(),
        "trainer_state.json is missing",
    ),
    "trainer_state_truncated": (
        lambda c: truncate(c / "trainer_state.json"),
        "trainer_state.json does not parse",
    ),
    "trainer_state_wrong_step": (
        lambda c: (c / "trainer_state.json").write_text('{"global_step": 7}'),
        "global_step 7, expected 2",
    ),
    "adapter_truncated": (
        lambda c: truncate(c / "adapter_model.safetensors"),
        "adapter_model.safetensors does not open",
    ),
    "adapter_empty": (
        lambda c: (c / "adapter_model.safetensors").write_bytes(b""),
        "adapter_model.safetensors is empty",
    ),
    "optimizer_truncated": (lambda c: truncate(c / "optimizer.pt"), "optimizer.pt does not load"),
    "optimizer_missing": (lambda c: (c / "optimizer.pt").unlink(), "optimizer.pt is missing"),
    "scheduler_missing": (lambda c: (c / "scheduler.pt").unlink(), "scheduler.pt is missing"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_incomplete_checkpoint_is_named_by_what_is_broken(case, two_checkpoints, tmp_path):
    """Case 'incomplete checkpoint': each way a save can be cut short is detected and named."""
    ckpt = tmp_path / "checkpoint-2"
    shutil.copytree(two_checkpoints / "run" / "sft" / "checkpoints" / "checkpoint-2", ckpt)
    assert checkpoint_problem(ckpt) is None  # the real checkpoint is complete
    corrupt, message = CORRUPTIONS[case]
    corrupt(ckpt)
    problem = checkpoint_problem(ckpt)
    assert problem is not None and message in problem


def test_truncated_checkpoint_is_moved_aside_and_the_previous_one_resumed(
    two_checkpoints, tmp_path, capsys
):
    """Case 'truncated checkpoint': checkpoint-2's adapter file was cut short by a kill during
    the save. The rerun moves it aside (named in the message, its files untouched) and resumes
    from checkpoint-1 instead of failing until --fresh."""
    run, cfg, ckpts = copy_run(two_checkpoints, tmp_path / "copy")
    truncate(ckpts / "checkpoint-2" / "adapter_model.safetensors")
    before = tree_digest(ckpts / "checkpoint-2")
    capsys.readouterr()
    rc = sft_main(["--config", str(cfg), "--run-dir", str(run), "--set", "sft.max_steps=3"])
    assert rc == 0
    err = capsys.readouterr().err
    aside = [p for p in ckpts.iterdir() if p.name.startswith("incomplete-checkpoint-2-")]
    assert len(aside) == 1, sorted(p.name for p in ckpts.iterdir())
    assert f"incomplete checkpoint {ckpts / 'checkpoint-2'}" in err
    assert "adapter_model.safetensors does not open" in err and aside[0].name in err
    assert tree_digest(aside[0]) == before  # moved, not changed
    t = json.loads((run / "sft" / "manifest.json").read_text())["training"]
    assert t["resumed_from_checkpoint"].endswith("checkpoint-1") and t["resumed_from_step"] == 1
    assert t["global_step"] == 3 and t["steps_run"] == 2  # steps 2 and 3 ran again
    assert checkpoint_problem(ckpts / "checkpoint-3") is None


def test_no_complete_checkpoint_starts_fresh(two_checkpoints, tmp_path, capsys):
    """Case 'every checkpoint incomplete': both are moved aside and training starts at step 0."""
    run, cfg, ckpts = copy_run(two_checkpoints, tmp_path / "copy")
    (ckpts / "checkpoint-1" / "trainer_state.json").unlink()
    truncate(ckpts / "checkpoint-2" / "optimizer.pt")
    capsys.readouterr()
    assert sft_main(["--config", str(cfg), "--run-dir", str(run)]) == 0
    err = capsys.readouterr().err
    assert "trainer_state.json is missing" in err and "optimizer.pt does not load" in err
    names = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("incomplete-"))
    assert [n.rsplit("-", 1)[0] for n in names] == [
        "incomplete-checkpoint-1",
        "incomplete-checkpoint-2",
    ]
    t = json.loads((run / "sft" / "manifest.json").read_text())["training"]
    assert t["resumed_from_checkpoint"] is None and t["resumed_from_step"] == 0
    assert t["global_step"] == 2 and t["steps_run"] == 2


# -- 2. training that changed nothing --------------------------------------------------------
def test_sft_with_learning_rate_zero_is_flagged_unchanged(
    two_checkpoints, tmp_path, small_model_dir
):
    """Case 'unchanged adapter (SFT, lr 0)': the only step is a warmup step, at lr 0 (a
    learning_rate of 0 itself is refused up front), so every lora_B is still zero: the
    manifest says adapter_unchanged: true and a warning names the adapter. The trained run of
    the fixture says false."""
    run = write_run(tmp_path / "run", stage1_records(8))
    lr0 = {**SMALL_SFT, "max_steps": 1, "warmup_steps": 1}
    cfg = write_config(tmp_path / "cfg.yaml", small_model_dir, lr0)
    with pytest.warns(AdapterUnchangedWarning, match="identical to its LoRA init"):
        assert sft_main(["--config", str(cfg), "--run-dir", str(run)]) == 0
    m = json.loads((run / "sft" / "manifest.json").read_text())
    assert m["adapter"]["adapter_unchanged"] is True
    trained = json.loads((two_checkpoints / "run" / "sft" / "manifest.json").read_text())
    assert trained["adapter"]["adapter_unchanged"] is False


def test_dpo_whose_only_step_has_learning_rate_zero_is_flagged_unchanged(
    tmp_path, small_model_dir, tiny_dpo_run
):
    """Case 'unchanged adapter (DPO, one warmup step)': one step with warmup_steps 1 runs at
    lr 0, so the DPO adapter equals the SFT adapter it continued: adapter_unchanged: true."""
    pairs = [dpo_pair(i) for i in range(4)]
    run, cfg = tiny_dpo_run(
        tmp_path, small_model_dir, pairs, max_steps=1, warmup_steps=1, save_steps=1, max_length=256
    )
    with pytest.warns(AdapterUnchangedWarning, match="identical to the adapter it started from"):
        assert dpo_main(["--config", str(cfg), "--run-dir", str(run)]) == 0
    m = json.loads((run / "dpo" / "manifest.json").read_text())
    assert m["training"]["global_step"] == 1
    assert m["adapter"]["adapter_unchanged"] is True


def test_an_unchanged_adapter_is_flagged_in_the_evaluation_report(
    tmp_path, tiny_qwen_dir, tiny_adapter_dir
):
    """Case 'unchanged adapter' in the report (issue 14 item 9: the manifest AND the report):
    the sft arm's stage manifest says adapter_unchanged: true for this very adapter (its hash),
    so the arm's record carries it and report.md says training changed nothing; a manifest
    about another adapter (another hash) is not trusted."""
    from utils.clean_model_loader import adapter_hash
    from utils.eval_arms import adapter_unchanged
    from utils.report import write_report

    run = tmp_path / "run"
    adapter = Path(shutil.copytree(tiny_adapter_dir, run / "sft" / "adapter"))
    sha = adapter_hash(adapter)
    manifest = {
        "stage": "sft",
        "status": "ok",
        "adapter": {"path": str(adapter), "sha256": sha, "adapter_unchanged": True},
    }
    (run / "sft" / "manifest.json").write_text(json.dumps(manifest))  # as save_adapter writes it
    assert adapter_unchanged(adapter, "another hash") is None
    cfg = EvalConfig(
        n_prompts=2,
        max_new_tokens=2,
        batch_size=4,
        run_sentinels=False,
        progress=False,
        arms=("base", "sft"),
        bootstrap_resamples=100,
        n_samples=1,
    )
    results = run_evaluation(run, cfg, ModelSpec(name=str(tiny_qwen_dir)), log=lambda _m: None)
    flags = {a["name"]: a["adapter_unchanged"] for a in results["arms"]}
    assert flags == {"base": None, "sft": True}
    md = Path(write_report(results, tmp_path / "eval")["report"]).read_text()
    assert "- **sft**: its adapter is identical to where its training started" in md
    assert "- **base**: its adapter" not in md


# -- 3. adapter of another shape -------------------------------------------------------------
def other_shape_adapter(out: Path, manifest_from: Path, hidden: int, layers: int) -> Path:
    """A LoRA adapter (q_proj, v_proj, like tiny_adapter_dir) for a Qwen2 of another size, with
    the tiny model's adapter_manifest.json copied over: the hash check alone would pass it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(
        Qwen2Config(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden,
                    num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)
    )  # fmt: skip
    cfg = LoraConfig(r=2, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    get_peft_model(model, cfg).save_pretrained(str(out))
    shutil.copy(manifest_from / "adapter_manifest.json", out / "adapter_manifest.json")
    return out


def test_adapter_of_another_hidden_size_is_refused_before_any_generation(
    tmp_path, tiny_qwen_dir, tiny_adapter_dir, monkeypatch
):
    """Case 'adapter shape mismatch': an adapter made for a hidden-size-32 model, carrying the
    tiny (hidden 64) model's manifest, fails before the ICL choice or the base arm generates,
    naming the adapter file and the first mismatching tensor; nothing is written."""
    bad = other_shape_adapter(tmp_path / "other", tiny_adapter_dir, hidden=32, layers=2)
    calls: list[int] = []
    real_generate = evaluation.generate

    def counting_generate(lm, prompts, *a, **k):
        calls.append(len(prompts))
        return real_generate(lm, prompts, *a, **k)

    monkeypatch.setattr(evaluation, "generate", counting_generate)  # the base_icl dev choice
    monkeypatch.setattr(eval_cache, "generate", counting_generate)  # the arms' generations
    run = tmp_path / "run"
    run.mkdir()
    cfg = EvalConfig(n_prompts=4, max_new_tokens=4, batch_size=4, icl_k=2, run_sentinels=False,
                     progress=False, arms=("base", "base_icl"), icl_candidates=("icl3", "icl6"),
                     icl_dev_prompts=4, bootstrap_resamples=100)  # fmt: skip
    out = tmp_path / "eval"
    with pytest.raises(EvalInputError) as e:
        run_evaluation(run, cfg, ModelSpec(name=str(tiny_qwen_dir)), adapters={"other": bad},
                       out_dir=out, log=lambda _m: None)  # fmt: skip
    msg = str(e.value)
    assert f"adapter {bad / 'adapter_model.safetensors'}" in msg
    assert "tensor base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in msg
    assert "has shape [2, 32]" in msg and "64 in-features" in msg
    assert calls == [] and not out.exists()


def test_adapter_with_more_layers_than_the_base_is_refused(
    tmp_path, tiny_qwen_dir, tiny_adapter_dir
):
    """Case 'adapter layer count mismatch': same hidden size, 3 layers on a 2-layer base."""
    base = BaseShapes.from_dir(tiny_qwen_dir)
    assert (base.hidden_size, base.num_layers) == (64, 2)
    assert adapter_shape_problem(tiny_adapter_dir, base) is None  # the matching adapter passes
    bad = other_shape_adapter(tmp_path / "deep", tiny_adapter_dir, hidden=64, layers=3)
    problem = adapter_shape_problem(bad, base)
    assert problem is not None and "layers.2." in problem
    assert "sits in layer 2 but the base has 2 layers" in problem


def test_adapter_shape_check_without_base_weights_uses_the_hidden_size(tmp_path, tiny_adapter_dir):
    """Case 'adapter shape mismatch, config only': with no base weight shapes (e.g. .bin
    weights) a block linear must have the hidden size on one side."""
    bad = other_shape_adapter(tmp_path / "other", tiny_adapter_dir, hidden=32, layers=2)
    base = BaseShapes.from_config({"hidden_size": 64, "num_hidden_layers": 2}, "cfg-only")
    assert adapter_shape_problem(tiny_adapter_dir, base) is None
    problem = adapter_shape_problem(bad, base)
    assert problem is not None
    assert (
        "neither side of model.layers.0.self_attn.q_proj has the base's hidden size 64" in problem
    )


# -- 4. configs validated up front -----------------------------------------------------------
def problems_for(*overrides: str) -> list[str]:
    return validate_config(load_config(DEFAULT_CONFIG, list(overrides)))


@pytest.mark.parametrize(
    "path", ["cpu_default.yaml", "quick.yaml", "qwen2.5-32b_h100.yaml"], ids=lambda p: p
)
def test_shipped_configs_are_valid(path):
    """Case 'shipped recipes': every recipe in configs/ validates with no problem."""
    assert validate_config(load_config(REPO_ROOT / "configs" / path)) == []


def test_config_sft_max_steps_minus_3_is_named():
    """Case '--set sft.max_steps=-3': -1 means no cap; -3 is neither."""
    assert problems_for("sft.max_steps=-3") == [
        "sft.max_steps: must be -1 (no cap) or >= 1, got -3"
    ]
    assert problems_for("sft.max_steps=-1") == []


def test_config_stage1_n_train_abc_is_named():
    """Case '--set stage1.n_train=abc': the override gives the string 'abc'."""
    assert problems_for("stage1.n_train=abc") == ["stage1.n_train: expected an integer, got 'abc'"]


def test_config_pairs_num_candidates_abc_is_named():
    """Case '--set pairs.num_candidates=abc'."""
    assert problems_for("pairs.num_candidates=abc") == [
        "pairs.num_candidates: expected an integer, got 'abc'"
    ]
    assert problems_for("pairs.num_candidates=1") == [
        "pairs.num_candidates: must be >= 2 (a pair needs two candidates), got 1"
    ]


def test_config_verified_num_candidates_abc_is_named():
    """Case '--set verified.num_candidates=abc'."""
    assert problems_for("verified.num_candidates=abc") == [
        "verified.num_candidates: expected an integer, got 'abc'"
    ]


def test_config_eval_n_prompts_abc_is_named():
    """Case '--set eval.n_prompts=abc'."""
    assert problems_for("eval.n_prompts=abc") == ["eval.n_prompts: expected an integer, got 'abc'"]


def test_config_every_problem_is_reported_at_once():
    """Case 'several bad values': all of them, in one list and in one ConfigError, including
    ranges the stage classes do not check (lr 0, probability 0) and a rule only the stage's
    own parser knows (sft.padding_free needs FlashAttention)."""
    overrides = [
        "sft.max_steps=-3", "stage1.n_train=abc", "pairs.num_candidates=abc",
        "eval.n_prompts=abc", "dpo.learning_rate=0", "verified.top_p=0",
        "sft.learning_rate=1e-3", "critic.batch_size=0", "model.quantization=3bit",
    ]  # fmt: skip
    problems = problems_for(*overrides)
    assert problems_for("sft.padding_free=true") == [
        "sft.padding_free needs FlashAttention (GPU only): set sft.attn_implementation to "
        "'flash_attention_2' or 'flash_attention_3', or padding_free: false on CPU"
    ]
    expected = [
        "stage1.n_train: expected an integer, got 'abc'",
        "verified.top_p: must be in (0, 1], got 0",
        "sft.max_steps: must be -1 (no cap) or >= 1, got -3",
        "sft.learning_rate: expected a number, got '1e-3' (YAML reads '1e-3' as text; write it "
        "with a dot, e.g. 1.0e-3)",
        "pairs.num_candidates: expected an integer, got 'abc'",
        "dpo.learning_rate: must be > 0, got 0",
        "eval.n_prompts: expected an integer, got 'abc'",
        "critic.batch_size: must be >= 1, got 0",
        "model.quantization: must be one of [None, 'none', '4bit', '8bit'], got '3bit'",
    ]
    assert sorted(problems) == sorted(expected)
    cfg = load_config(DEFAULT_CONFIG, overrides)
    with pytest.raises(ConfigError, match=r"9 problem\(s\)") as e:
        check_config(cfg)
    assert all(p in str(e.value) for p in expected)


def test_config_unknown_section_and_key_are_named():
    """Case 'typo in a section or key' (a YAML file, not --set, which refuses unknown keys)."""
    cfg = load_config(DEFAULT_CONFIG)
    cfg["sfft"] = {"max_steps": 3}
    cfg["dpo"] = {**cfg["dpo"], "betta": 0.1}
    problems = validate_config(cfg)
    assert any(p.startswith("sfft: unknown section") for p in problems)
    assert any(p.startswith("dpo.betta: unknown key") for p in problems)
    assert len(problems) == 2


# -- 5. a full disk, a broken torch ----------------------------------------------------------
def test_a_full_disk_while_appending_names_the_file_and_loses_nothing_written(tmp_path):
    """Case 'full disk during a stage's JSONL writes': the write that hits ENOSPC (half its
    line on disk) raises DiskFullError naming the file; the records before it are intact and
    the rerun's resume() drops the torn half line, so appending goes on."""
    import errno

    from utils.jsonl_io import DiskFullError, JsonlAppender, read_jsonl, resume

    path = tmp_path / "pairs.jsonl"
    out = JsonlAppender(path)
    out.write_many([{"id": "a"}, {"id": "b"}])
    real = out._f

    class FullDisk:  # the file object once the disk is full: half a line, then ENOSPC
        def write(self, text: str) -> None:
            real.write(text[: len(text) // 2])
            real.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    out._f = FullDisk()
    with pytest.raises(DiskFullError, match=f"disk full while appending to {path}"):
        out.write({"id": "c", "text": "x" * 40})
    real.close()
    records, torn = resume(path)
    assert [r["id"] for r in records] == ["a", "b"] and torn == 1
    with JsonlAppender(path) as again:
        again.write({"id": "c"})
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("sleep 30", "`import torch` did not finish in 1 s"),
        ("echo 'ImportError: libtorch_cpu.so: cannot open' >&2; exit 1",
         "`import torch` failed: ImportError: libtorch_cpu.so: cannot open"),
    ],
    ids=["hangs", "fails"],
)  # fmt: skip
def test_preflight_reports_a_torch_import_that_hangs_or_fails(body, message, tmp_path, monkeypatch):
    """Case 'import torch hangs or fails': preflight imports torch in a child process with a
    timeout and reports, instead of hanging or dying (a stand-in interpreter plays the broken
    install)."""
    import sys

    from scripts.preflight import check_torch

    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\n{body}\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    ok, detail, info = check_torch(timeout_s=1)
    assert (ok, info) == (False, {}) and detail.startswith(message), detail
