"""Per-pair soft labels in the DPO loss (utils/dpo_loss.py) and the [sigmoid, sft] combination,
checked against losses computed by hand from plain forward passes on the tiny Qwen: policy and
reference log-probs of every chosen/rejected sequence, one unpadded sequence at a time, with
torch.log_softmax; then the formulas. Plus a short real training run through the stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from scripts.train_stage1_dpo import main as dpo_main
from tests.conftest import dpo_pair, fresh_copy, make_sft_adapter
from utils.dpo import (
    DPOStageConfig,
    attach_trainable_sft_adapter,
    build_dpo_trainer,
    load_pairs,
    make_dpo_args,
)
from utils.jsonl_io import read_jsonl, write_jsonl_atomic

ROOT = Path(__file__).resolve().parent.parent
BETA = 0.1
LABELS = [0.6, 0.8, 1.0, 0.7]


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory, tiny_qwen_dir):
    return make_sft_adapter(tiny_qwen_dir, tmp_path_factory.mktemp("soft-sft") / "adapter")


@pytest.fixture(scope="module")
def reference(tiny_qwen, sft_dir):
    """The reference computed independently of TRL: the base with the SFT adapter, loaded anew."""
    from peft import PeftModel

    return PeftModel.from_pretrained(fresh_copy(tiny_qwen).model, str(sft_dir)).eval()


def make_trainer(tiny_qwen, sft_dir, tmp_path, **dpo):
    """A real SoftLabelDPOTrainer on 4 pairs; its policy moved away from the reference (the SFT
    adapter) so that h != 0. Building one costs seconds (datasets hashes the 151k-token
    tokenizer), so the tests share two."""
    cfg = DPOStageConfig.from_dict(
        {"beta": BETA, "max_length": 64, "per_device_train_batch_size": 4, **dpo}
    )
    lm = attach_trainable_sft_adapter(fresh_copy(tiny_qwen), sft_dir)
    pairs = [dpo_pair(i, soft_label=s) for i, s in enumerate(LABELS)]
    trainer = build_dpo_trainer(lm, pairs, [], cfg, make_dpo_args(cfg, tmp_path, False, True))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name and ".default." in name:
                p.add_(torch.randn_like(p) * 0.05)
    trainer.model.eval()
    return trainer


# (dpo settings, sigmoid weight, sft weight): the sigmoid loss with the reference forward inside
# the loss; [sigmoid, sft] with the reference log-probs precomputed (the GPU recipe's setting).
SETUPS = {
    "sigmoid-ref-forward": ({}, 1.0, 0.0),
    "sigmoid+sft-ref-precomputed": (
        {"loss_type": ["sigmoid", "sft"], "loss_weights": [0.7, 0.5],
         "precompute_ref_log_probs": True},
        0.7, 0.5,
    ),
}  # fmt: skip


@pytest.fixture(scope="module", params=list(SETUPS))
def soft_trainer(request, tiny_qwen, sft_dir, tmp_path_factory):
    dpo, w_sig, w_sft = SETUPS[request.param]
    trainer = make_trainer(tiny_qwen, sft_dir, tmp_path_factory.mktemp("soft"), **dpo)
    rows = [trainer.train_dataset[i] for i in range(len(LABELS))]
    return trainer, rows, w_sig, w_sft


def batch_of(trainer, rows, labels=None):
    batch = trainer.data_collator(rows)
    if labels is not None:
        batch["soft_label"] = torch.tensor(labels)
    return batch


def seq_logp(model, prompt_ids, completion_ids):
    """Summed log-prob of the completion tokens after the prompt: one unpadded forward."""
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    tok = logp.gather(1, ids[0, 1:, None])[:, 0]
    return tok[len(prompt_ids) - 1 :]  # per completion token


def hand_terms(trainer, reference, rows):
    """(h_i with the policy's graph, chosen per-token policy log-probs) of every pair."""
    h, chosen_tokens = [], []
    for r in rows:
        pc = seq_logp(trainer.model, r["prompt_ids"], r["chosen_ids"])
        pr = seq_logp(trainer.model, r["prompt_ids"], r["rejected_ids"])
        with torch.no_grad():
            rc = seq_logp(reference, r["prompt_ids"], r["chosen_ids"]).sum()
            rr = seq_logp(reference, r["prompt_ids"], r["rejected_ids"]).sum()
        h.append((pc.sum() - rc) - (pr.sum() - rr))
        chosen_tokens.append(pc)
    return torch.stack(h), chosen_tokens


def soft_sigmoid(h, p):
    """Conservative DPO with eps_i = 1 - p_i, in its original form."""
    p = torch.tensor(p)
    return (-p * F.logsigmoid(BETA * h) - (1 - p) * F.logsigmoid(-BETA * h)).mean()


# -- pure ------------------------------------------------------------------------------------
def test_config_and_pairs_carry_soft_labels(tmp_path):
    cfg = DPOStageConfig.from_dict({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]})
    assert cfg.soft_labels and cfg.loss_weights == [1.0, 0.5]
    with pytest.raises(ValueError, match="loss_weights"):
        DPOStageConfig.from_dict({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]})
    with pytest.raises(ValueError, match="soft_labels smooths the sigmoid"):
        DPOStageConfig.from_dict({"loss_type": "ipo"})
    assert DPOStageConfig.from_dict({"loss_type": "ipo", "soft_labels": False}).loss_type == "ipo"
    for name in ("cpu_default", "qwen2.5-32b_h100"):
        d = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())["dpo"]
        assert d["loss_type"] == ["sigmoid", "sft"] and d["soft_labels"] is True, name
    p = tmp_path / "pairs.jsonl"
    unlabelled = {k: v for k, v in dpo_pair(2).items() if k != "soft_label"}
    write_jsonl_atomic(p, [dpo_pair(0, soft_label=0.6), dpo_pair(1, soft_label=1), unlabelled])
    pairs, info = load_pairs(p)
    assert [x["soft_label"] for x in pairs] == [0.6, 1.0, 1.0]
    assert info["n_without_soft_label"] == 1
    for bad in (0.4, 1.2, "0.9", True):
        write_jsonl_atomic(p, [dpo_pair(0, soft_label=bad)])
        with pytest.raises(ValueError, match="soft_label must be a number in"):
            load_pairs(p)


# -- the loss against hand computation ------------------------------------------------------
def test_loss_matches_the_hand_formula_value_and_gradient(soft_trainer, reference):
    trainer, rows, w_sig, w_sft = soft_trainer
    batch = batch_of(trainer, rows)
    assert batch["soft_label"].tolist() == pytest.approx(LABELS)  # the column reached the batch
    assert ("ref_chosen_logps" in batch) == trainer.precompute_ref_logps
    with torch.no_grad():
        h, chosen = hand_terms(trainer, reference, rows)
    assert h.abs().min() > 1e-3  # the policy really differs from the reference
    nll = -torch.cat(chosen).mean()  # TRL's sft term: token-mean NLL over the batch's chosen
    for labels in (LABELS, [1.0] * 4):
        with torch.no_grad():
            got = trainer.compute_loss(trainer.model, batch_of(trainer, rows, labels)).item()
        want = w_sig * soft_sigmoid(h, labels) + w_sft * nll
        assert got == pytest.approx(want.item(), abs=1e-5), labels
        if w_sft:
            assert abs(got - w_sig * soft_sigmoid(h, labels).item()) > 1e-3  # the sft term counts

    # The gradient flows through the soft term (and the sft term): same as the hand loss's.
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    g_trl = torch.autograd.grad(
        trainer.compute_loss(trainer.model, batch_of(trainer, rows)), params
    )
    h, chosen = hand_terms(trainer, reference, rows)
    hand = w_sig * soft_sigmoid(h, LABELS) - w_sft * torch.cat(chosen).mean()
    g_hand = torch.autograd.grad(hand, params)
    for a, b in zip(g_trl, g_hand, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_hard_labels_equal_trls_own_loss(soft_trainer):
    from trl import DPOTrainer

    trainer, rows, _, _ = soft_trainer
    batch = batch_of(trainer, rows)
    plain = {k: v for k, v in batch.items() if k != "soft_label"}
    with torch.no_grad():
        trl_loss = DPOTrainer.compute_loss(trainer, trainer.model, plain).item()
        hard = trainer.compute_loss(trainer.model, batch_of(trainer, rows, [1.0] * 4)).item()
        soft = trainer.compute_loss(trainer.model, batch_of(trainer, rows, [0.6] * 4)).item()
    assert hard == pytest.approx(trl_loss, abs=1e-6)
    assert abs(soft - trl_loss) > 1e-4


# -- a real run through the stage ----------------------------------------------------------
def test_stage_trains_with_soft_labels_and_the_sft_term(tmp_path, tiny_qwen_dir, tiny_dpo_run):
    pairs = [dpo_pair(i, soft_label=LABELS[i % 4]) for i in range(6)]
    run, cfg = tiny_dpo_run(
        tmp_path, tiny_qwen_dir, pairs, max_steps=3, save_steps=3,
        loss_type=["sigmoid", "sft"], loss_weights=[1.0, 1.0], soft_labels=True,
    )  # fmt: skip
    assert dpo_main(["--config", str(cfg), "--run-dir", str(run)]) == 0
    log = [r for r in read_jsonl(run / "dpo" / "dpo_log.jsonl") if "loss" in r]
    assert [r["step"] for r in log] == [1, 2, 3]
    for r in log:
        assert 0.6 <= r["soft_label"] <= 1.0  # the labels reached the loss
        assert r["chosen_logratio_nats"] == pytest.approx(r["rewards/chosen"] / BETA)
    m = json.loads((run / "dpo" / "manifest.json").read_text())
    assert m["training"]["global_step"] == 3 and m["chosen_logprob_trend"]["n_points"] == 3
    am = json.loads((run / "dpo" / "adapter" / "adapter_manifest.json").read_text())
    assert am["soft_labels"] is True and am["loss_type"] == ["sigmoid", "sft"]
    assert (run / "dpo" / "adapter" / "adapter_model.safetensors").stat().st_size > 0
