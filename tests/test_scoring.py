"""utils.scoring: log-probabilities of given text, with the shared prefix computed once.

Each result is checked against an unpadded single-row forward pass (the definition), and the
shared-prefix path against the path without it, on a tiny random Qwen2 and on the real
Gemma-3-270M (sliding-window attention, final-logit soft-capping)."""

from __future__ import annotations

import pytest
import torch

from utils.scoring import (
    MIN_SHARED_PREFIX,
    completion_logprobs,
    next_token_logprobs,
    shared_prefix_length,
)

HEADER = (
    "Requests sent to a helpful assistant, each checked by a reviewer who answers Yes or No. "
    "The reviewer is careful and writes one word.\n\n"
)
PROMPTS = [
    HEADER + "Instruction: Name a fruit.\nAnswer:",
    HEADER + "Instruction: What is 2+2? Think.\nAnswer:",
    HEADER + "Instruction: x\nAnswer:",
]
COMPLETIONS = [" Mango.\nInstruction:", " 4", " It is a letter of the alphabet, near the end."]


def _reference_next(lm, prompt: str, cands: list[int]) -> torch.Tensor:
    ids = lm.encode(prompt)
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([ids])).logits[0, -1]
    return torch.log_softmax(logits.float(), -1)[cands]


def _reference_completion(lm, prefix: str, completion: str) -> float:
    p_ids = lm.encode(prefix)
    c_ids = lm.tokenizer(completion, add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([p_ids + c_ids])).logits[0]
    logp = torch.log_softmax(logits.float(), -1)
    return sum(float(logp[len(p_ids) - 1 + k, t]) for k, t in enumerate(c_ids))


def test_shared_prefix_length_leaves_every_read_position_outside_the_prefix():
    rows = [[1, 2, 3, 4, 5], [1, 2, 3, 9], [1, 2, 3, 4, 7, 8]]
    assert shared_prefix_length(rows, [1, 1, 1]) == 3
    assert shared_prefix_length(rows, [2, 2, 2]) == 2  # row 1 reads positions 2 and 3
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]], [1, 1]) == 2  # identical rows
    assert shared_prefix_length([[1, 2, 3]], [1]) == 0  # one row: nothing to share
    assert shared_prefix_length([[5, 2], [6, 2]], [1, 1]) == 0


def _check_against_reference(lm, atol: float) -> None:
    cands = [0, 1, 7]
    for msp in (None, MIN_SHARED_PREFIX):
        got = next_token_logprobs(lm, PROMPTS, cands, batch_size=2, min_shared_prefix=msp)
        for i, p in enumerate(PROMPTS):
            assert torch.allclose(got[i], _reference_next(lm, p, cands), atol=atol), (msp, i)
        scored = completion_logprobs(lm, PROMPTS, COMPLETIONS, batch_size=2, min_shared_prefix=msp)
        for (lp, n), p, c in zip(scored, PROMPTS, COMPLETIONS, strict=True):
            assert n == len(lm.tokenizer(c, add_special_tokens=False).input_ids)
            assert lp == pytest.approx(_reference_completion(lm, p, c), abs=atol * n), msp


def test_results_equal_an_unpadded_forward_with_and_without_the_shared_prefix(tiny_qwen):
    _check_against_reference(tiny_qwen, atol=1e-4)


def test_shared_prefix_is_run_once_per_call(tiny_qwen, monkeypatch):
    calls: list[tuple[int, int]] = []
    real = tiny_qwen.model.forward

    def spy(*args, **kwargs):
        ids = kwargs["input_ids"]
        calls.append(tuple(ids.shape))
        return real(*args, **kwargs)

    monkeypatch.setattr(tiny_qwen.model, "forward", spy)
    next_token_logprobs(tiny_qwen, PROMPTS, [0], batch_size=2)
    prefix_len = shared_prefix_length([tiny_qwen.encode(p) for p in PROMPTS], [1, 1, 1])
    assert prefix_len >= MIN_SHARED_PREFIX
    # one prefix pass (batch 1, the whole prefix), then two batches of tails only
    assert calls[0] == (1, prefix_len) and len(calls) == 3
    assert all(width < 20 for _, width in calls[1:])


def test_bad_input_is_named(tiny_qwen):
    with pytest.raises(ValueError, match="prefixes but"):
        completion_logprobs(tiny_qwen, PROMPTS, COMPLETIONS[:2])
    with pytest.raises(ValueError, match="completion 0 is empty"):
        completion_logprobs(tiny_qwen, PROMPTS[:1], [""])


@pytest.mark.slow
def test_gemma_sliding_window_and_softcap_give_the_same_numbers(gemma):
    _check_against_reference(gemma, atol=2e-4)
