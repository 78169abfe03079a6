"""Stage-1 DPO: pair validation and the chosen log-prob warning (pure, hand-computed values),
then a real 2-step TRL DPO run on the tiny Qwen continuing a (non-trivial) SFT adapter."""

from __future__ import annotations

import json
import warnings

import pytest

from scripts.train_stage1_dpo import main as dpo_main
from tests.conftest import dpo_pair
from utils.clean_model_loader import weights_hash
from utils.dpo import (
    ChosenLogprobWarning,
    ChosenTrendCallback,
    DPOStageConfig,
    check_no_eos,
    chosen_logprob_trend,
    dpo_log_transform,
    least_squares_slope,
    load_pairs,
)
from utils.jsonl_io import read_jsonl, write_jsonl_atomic
from utils.training_common import JsonlLogCallback


def rows(values, start=1):
    return [{"step": start + i, "chosen_logratio_nats": v} for i, v in enumerate(values)]


# -- pure --------------------------------------------------------------------------------------
def test_config_validation():
    assert DPOStageConfig.from_dict({}).loss_type == "sigmoid"
    assert DPOStageConfig.from_dict({"loss_type": ["sigmoid", "sft"]}).loss_type == [
        "sigmoid",
        "sft",
    ]
    with pytest.raises(ValueError, match="unknown key"):
        DPOStageConfig.from_dict({"betta": 0.1})
    with pytest.raises(ValueError, match="loss_type"):
        DPOStageConfig.from_dict({"loss_type": "sigmod"})
    with pytest.raises(ValueError, match="beta must be positive"):
        DPOStageConfig.from_dict({"beta": 0.0})


def test_least_squares_slope_hand_value():
    # mean x = 2, mean y = 13/3; sxy = (-1)(2 - 13/3) + (1)(7 - 13/3) = 5; sxx = 2
    assert least_squares_slope([1, 2, 3], [2, 4, 7]) == pytest.approx(2.5)
    assert least_squares_slope([1], [5]) == 0.0


def test_trend_flags_a_sustained_fall_of_the_chosen_logprob():
    t = chosen_logprob_trend(rows([0.0, -0.5, -1.0, -1.5, -2.0, -2.5]), warn_nats=1.0, window=2)
    assert t["falling"] is True
    assert t["first_mean_nats"] == pytest.approx(-0.25)  # (0 - 0.5) / 2
    assert t["last_mean_nats"] == pytest.approx(-2.25)  # (-2 - 2.5) / 2
    assert t["drop_nats"] == pytest.approx(2.0)
    assert t["slope_nats_per_step"] == pytest.approx(-0.5)
    assert "trl #800" in t["message"]


@pytest.mark.parametrize(
    "values",
    [
        [0.0, 0.5, 1.0, 1.5],  # chosen rising
        [0.0, 0.1, -0.1, 0.05, -0.05, 0.0],  # flat (only the rejected side moved)
        [0.0, -3.0, 0.0, 0.2, 0.1, 0.3],  # one bad batch, recovered
        [0.0, -0.2, -0.4, -0.6, -0.8],  # falling but by less than warn_nats
    ],
)
def test_trend_does_not_warn_without_a_sustained_fall(values):
    assert chosen_logprob_trend(rows(values), warn_nats=1.0, window=2)["falling"] is False


def test_trend_needs_two_points_and_ignores_eval_rows():
    t = chosen_logprob_trend(
        [{"step": 1, "chosen_logratio_nats": -5.0}, {"step": 1, "eval_loss": 1}]
    )
    assert t["falling"] is False and t["n_points"] == 1


def test_log_transform_and_warning_callback(tmp_path):
    from transformers import TrainerState

    transform = dpo_log_transform(beta=0.1)
    assert transform({"rewards/chosen": -0.05})["chosen_logratio_nats"] == pytest.approx(-0.5)
    assert "chosen_logratio_nats" not in transform({"eval_rewards/chosen": -0.05})
    log_cb = JsonlLogCallback(tmp_path / "dpo_log.jsonl", transform=transform)
    trend = ChosenTrendCallback(log_cb, warn_nats=1.0, window=2)
    state = TrainerState()
    state.is_world_process_zero = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, reward in enumerate([0.0, -0.05, -0.1, -0.15, -0.2, -0.25], start=1):
            state.global_step = step
            logs = {"loss": 0.69, "rewards/chosen": reward}
            log_cb.on_log(None, state, None, logs=logs)
            trend.on_log(None, state, None, logs=logs)
    falls = [w for w in caught if issubclass(w.category, ChosenLogprobWarning)]
    assert len(falls) == 1 and "step 5" in str(falls[0].message)  # first time the fall is sustained
    logged = read_jsonl(tmp_path / "dpo_log.jsonl")
    assert [r["chosen_logratio_nats"] for r in logged] == pytest.approx(
        [0, -0.5, -1, -1.5, -2, -2.5]
    )


def test_load_pairs_validates_the_shared_format(tmp_path):
    p = tmp_path / "pairs.jsonl"
    write_jsonl_atomic(p, [dpo_pair(0), dpo_pair(1), dpo_pair(2)])
    pairs, info = load_pairs(p)
    assert [x["id"] for x in pairs] == ["p0", "p1", "p2"] and info["n_records"] == 3
    assert set(pairs[0]) == {"id", "prompt", "chosen", "rejected", "soft_label"}
    kept, info = load_pairs(p, min_margin=0.15)  # margins 0.0, 0.1, 0.2
    assert [x["id"] for x in kept] == ["p2"] and info["n_below_min_margin"] == 2
    bad = {
        "not in the shared format": dpo_pair(0, prompt="Q: Name a colour.\nA:"),
        "must be format_completion": dpo_pair(0, chosen="Red."),
        "identical": dpo_pair(0, rejected=dpo_pair(0)["chosen"]),
    }
    for needle, rec in bad.items():
        write_jsonl_atomic(p, [dpo_pair(1), rec])
        with pytest.raises(ValueError, match=needle) as e:
            load_pairs(p)
        assert ":2 (id 'p0')" in str(e.value)
    write_jsonl_atomic(p, [dpo_pair(1), dpo_pair(1)])
    with pytest.raises(ValueError, match="duplicate id"):
        load_pairs(p)
    with pytest.raises(ValueError, match="contains the EOS"):
        check_no_eos([dpo_pair(3, chosen=" Red.<|endoftext|>")], "<|endoftext|>")


# -- a real DPO run --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_qwen_dir, tiny_dpo_run):
    pairs = [dpo_pair(i) for i in range(8)]
    run, cfg = tiny_dpo_run(tmp_path_factory.mktemp("dpo-run"), tiny_qwen_dir, pairs)
    rc = dpo_main(["--config", str(cfg), "--run-dir", str(run)])
    return run, cfg, rc


def test_dpo_logs_rewards_margins_and_the_chosen_trend(dpo_run):
    run, _, rc = dpo_run
    assert rc == 0
    log = [r for r in read_jsonl(run / "dpo" / "dpo_log.jsonl") if "loss" in r]
    assert [r["step"] for r in log] == [1, 2]
    for r in log:
        for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"):
            assert isinstance(r[k], float), k
        assert r["chosen_logratio_nats"] == pytest.approx(r["rewards/chosen"] / 0.1)
        assert r["rewards/margins"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"])
    # Step 1 runs the untouched SFT adapter: policy == reference exactly, because the reference
    # IS the SFT adapter (the bare base would differ: the adapter's B is non-zero).
    assert log[0]["rewards/chosen"] == 0.0 and log[0]["rewards/rejected"] == 0.0
    assert log[1]["rewards/margins"] != 0.0  # the update of step 1 moved the policy
    m = json.loads((run / "dpo" / "manifest.json").read_text())
    assert m["stage"] == "dpo" and m["training"]["global_step"] == 2
    assert m["chosen_logprob_trend"]["n_points"] == 2
    assert m["mask_audit"]["passed"] and m["mask_audit"]["splits"]["train"]["n_checked"] == 16


def test_dpo_adapter_continues_the_sft_adapter(dpo_run, tiny_qwen_dir):
    from safetensors.torch import load_file

    run, _, _ = dpo_run
    sft, dpo = run / "sft" / "adapter", run / "dpo" / "adapter"
    am = json.loads((dpo / "adapter_manifest.json").read_text())
    assert am["base_weights_sha256"] == weights_hash(tiny_qwen_dir)
    assert am["parent_adapter_sha256"] == weights_hash(sft) and am["stage"] == "dpo"
    assert not (dpo / "ref").exists()  # only the trained adapter is saved, not TRL's reference
    a, b = (
        load_file(str(sft / "adapter_model.safetensors")),
        load_file(str(dpo / "adapter_model.safetensors")),
    )
    assert set(a) == set(b)  # same LoRA layout: the SFT adapter, trained further
    assert any((a[k] - b[k]).abs().max() > 0 for k in a)


def test_dpo_refuses_an_adapter_of_another_base(dpo_run, tmp_path, capsys):
    run, cfg, _ = dpo_run
    other = tmp_path / "adapter"
    other.mkdir()
    for f in (run / "sft" / "adapter").iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    am = json.loads((other / "adapter_manifest.json").read_text())
    (other / "adapter_manifest.json").write_text(
        json.dumps({**am, "base_weights_sha256": "0" * 64})
    )
    rc = dpo_main(
        [
            "--config",
            str(cfg),
            "--run-dir",
            str(run),
            "--sft-adapter",
            str(other),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2 and "trained on base model" in capsys.readouterr().err
    assert dpo_main(["--config", str(cfg), "--run-dir", str(tmp_path / "none")]) == 2


def test_overrides_section_replaces_the_dpo_keys_it_names(dpo_run, tmp_path):
    """The cai stage trains with ``--overrides-section cai_dpo``: its keys replace the dpo
    section's (here max_steps 2 -> 1), the others stay, and the manifest records both."""
    import yaml

    run, cfg, _ = dpo_run
    config = yaml.safe_load(cfg.read_text())
    config["cai_dpo"] = {"max_steps": 1}
    cfg2 = tmp_path / "cfg.yaml"
    cfg2.write_text(yaml.safe_dump(config))
    out = tmp_path / "cai"
    args = ["--config", str(cfg2), "--run-dir", str(run), "--out", str(out)]
    assert dpo_main([*args, "--overrides-section", "cai_dpo"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["training"]["global_step"] == 1 and m["config"]["dpo"]["max_steps"] == 1
    assert m["config"]["overrides_section"] == "cai_dpo"
    assert m["config"]["dpo"]["learning_rate"] == config["dpo"]["learning_rate"]
