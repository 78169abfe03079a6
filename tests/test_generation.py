"""The batched generation engine on a tiny random Qwen2 model (real code path, seconds)."""

from __future__ import annotations

import dataclasses

import pytest

from utils.clean_model_loader import ContaminationError
from utils.generation import (
    STOP_EOS,
    STOP_LIMIT,
    STOP_STRING,
    DecodingConfig,
    _finish_row,
    generate,
)

PROMPTS = [
    "Instruction: Name a colour.\nResponse:",
    "Hi",
    "Instruction: Count to three, slowly please.\nResponse:",
]


def test_batched_greedy_equals_one_at_a_time(tiny_qwen):
    dc = DecodingConfig(max_new_tokens=12, batch_size=8)
    batched = generate(tiny_qwen, PROMPTS, dc, progress=False)
    single = [generate(tiny_qwen, [p], dc, progress=False)[0] for p in PROMPTS]
    assert [g.raw_completion for g in batched] == [g.raw_completion for g in single]
    assert all(g.stop_reason in (STOP_LIMIT, STOP_EOS) for g in batched)


def test_sampling_is_per_prompt_reproducible_whatever_ran_before(tiny_qwen):
    dc = DecodingConfig(max_new_tokens=10, do_sample=True, temperature=1.0, top_p=0.9, batch_size=2)
    a = generate(tiny_qwen, PROMPTS, dc, seed=5, progress=False)
    generate(
        tiny_qwen, ["something else entirely"] * 3, dc, seed=9, progress=False
    )  # unrelated call
    b = generate(tiny_qwen, PROMPTS[::-1], dc, seed=5, progress=False)[::-1]  # other batches
    assert [g.raw_completion for g in a] == [g.raw_completion for g in b]
    c = generate(tiny_qwen, PROMPTS, dc, seed=6, progress=False)
    assert [g.raw_completion for g in a] != [g.raw_completion for g in c]


def test_stops_on_whole_stop_string_and_counts_tokens(tiny_qwen):
    dc = DecodingConfig(max_new_tokens=16, batch_size=4)
    free = generate(tiny_qwen, PROMPTS[:1], dc, progress=False)[0]
    ids = tiny_qwen.tokenizer(free.raw_completion, add_special_tokens=False).input_ids
    # A stop string spanning tokens 5..7 of the free-running completion.
    stop = tiny_qwen.tokenizer.decode(ids[5:8])
    cut = generate(
        tiny_qwen,
        PROMPTS[:1],
        DecodingConfig(max_new_tokens=16, stop_strings=(stop,)),
        progress=False,
    )[0]
    assert cut.stop_reason == STOP_STRING and cut.matched_stop == stop
    assert free.raw_completion.startswith(cut.raw_completion)
    assert cut.raw_completion.endswith(stop) and stop not in cut.text
    assert cut.n_new_tokens == len(
        tiny_qwen.tokenizer(cut.raw_completion, add_special_tokens=False).input_ids
    )


def test_finish_row_never_stops_on_the_last_token_of_a_stop_string(tiny_qwen):
    # Regression (KNOWN_BUGS #1): the old system stopped on ':' because it used the stop
    # string's last token as an EOS id.
    tok = tiny_qwen.tokenizer
    ids = tok(" Note: a colon.\nInstruction: next", add_special_tokens=False).input_ids
    text, raw, reason, which, n = _finish_row(tiny_qwen, ids, ["\nInstruction:"])
    assert reason == STOP_STRING and text == " Note: a colon." and which == "\nInstruction:"
    eos = tiny_qwen.policy.eos_token_id
    text, raw, reason, _, n = _finish_row(tiny_qwen, [*ids[:3], eos, 5, 6], ["\nInstruction:"])
    assert reason == STOP_EOS and n == 4 and text == tok.decode(ids[:3])


def test_generation_refuses_chat_markup_in_prompts(tiny_qwen):
    with pytest.raises(ContaminationError):
        generate(
            tiny_qwen,
            ["<|im_start|>user\nhi<|im_end|>"],
            DecodingConfig(max_new_tokens=2),
            progress=False,
        )


def test_decoding_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown decoding keys"):
        DecodingConfig.from_dict({"max_new_token": 3})


@pytest.mark.parametrize(("top_p", "top_k"), [(1.0, 0), (0.7, 0), (1.0, 5), (0.9, 8)])
def test_per_row_sampler_matches_the_nucleus_distribution(top_p, top_k):
    import torch

    from utils.generation import PerRowGumbelSampler

    torch.manual_seed(0)
    logits = torch.randn(30)
    sampler = PerRowGumbelSampler([1], 1.0, top_p, top_k)
    sampler.candidate_k = 10  # exercise the candidate search and its full-sort fallback
    n = 6000
    counts = torch.zeros(30)
    for _ in range(n):
        counts[sampler._pick(logits, sampler.generators[0])] += 1
    p = torch.softmax(logits, -1)
    sp, si = torch.sort(p, descending=True)
    mass_before = sp.cumsum(0) - sp
    keep = torch.zeros(30, dtype=torch.bool)
    for rank in range(30):
        if (top_p < 1 and mass_before[rank] > top_p) or (top_k and rank >= top_k):
            continue
        keep[si[rank]] = True
    q = torch.where(keep, p, torch.zeros_like(p))
    q = q / q.sum()
    assert bool(((counts > 0) <= keep).all()), "sampled outside the nucleus"
    assert float((counts / n - q).abs().max()) < 0.03


def test_stop_string_matcher_is_built_once_per_model(tiny_qwen):
    # Regression (KNOWN_BUGS #12): the matcher was rebuilt (seconds) on every call.
    from utils.generation import stop_string_criteria

    a = stop_string_criteria(tiny_qwen, ("\nInstruction:",))
    generate(
        tiny_qwen,
        PROMPTS[:1],
        DecodingConfig(max_new_tokens=2, stop_strings=("\nInstruction:",)),
        progress=False,
    )
    assert stop_string_criteria(tiny_qwen, ("\nInstruction:",)) is a
    assert stop_string_criteria(tiny_qwen, ("\n",)) is not a


LOOP_PROMPTS = [
    "Instruction: Name a color.\nResponse:",
    "The capital of France is",
    "Instruction: Write a haiku about the sea, then stop.\nResponse:",
    "1, 2, 3,",
    "Once upon a time",
    "Q: What is 2 + 2?\nA:",
    "Once upon a time",  # a repeated prompt is prefilled once, then sampled per row
    "Instruction: Name a color.\nResponse:",
]


@pytest.mark.parametrize("do_sample", [False, True])
def test_shrinking_loop_gives_hf_generates_tokens_and_stops(tiny_qwen, do_sample):
    """The shrinking loop (finished rows leave the batch) decodes what transformers' generate
    decodes: same text, stop reason, matched stop and token counts, greedy and sampled, rows of
    unequal prompt lengths in one batch. The stop strings are cut from the model's own free
    output, so rows really stop at different steps (a random model never emits EOS)."""
    base = dict(max_new_tokens=24, batch_size=8, do_sample=do_sample, temperature=0.9, top_p=0.9)
    # Greedy: repeated prompts too (prefilled once). Sampled: distinct prompts only, as a random
    # model's near-flat distribution flips a sample on the last-bit differences that another
    # prefill batch shape gives.
    prompts = LOOP_PROMPTS if not do_sample else LOOP_PROMPTS[:6]
    free = generate(tiny_qwen, prompts, DecodingConfig(**base), seed=7, progress=False)
    # (A stop string that starts inside the prompt is left out: transformers then pads the row
    # with pad_token_id, which Qwen's tokenizer shares with EOS, and reports "eos".)
    cuts = [(g.text[4 + 3 * i : 7 + 3 * i], g) for i, g in enumerate(free)]
    stops = tuple(c for c, g in cuts if c not in g.prompt[-3:] + g.text[:3])[:3]
    dc = DecodingConfig(**base, stop_strings=stops)
    shrink = generate(tiny_qwen, prompts, dc, seed=7, progress=False)
    hf = generate(tiny_qwen, prompts, dataclasses.replace(dc, loop="hf_generate"), seed=7,
                  progress=False)  # fmt: skip
    assert [dataclasses.astuple(g) for g in shrink] == [dataclasses.astuple(g) for g in hf]
    assert {g.stop_reason for g in shrink} == {"stop_string", "max_new_tokens"}
    assert len({g.n_new_tokens for g in shrink}) > 2


@pytest.mark.slow
def test_shrinking_loop_gives_hf_generates_tokens_on_gemma(gemma):
    """Gemma-3 (sliding-window layers, logit soft-capping): greedy outputs of the shrinking
    loop equal transformers' generate, rows finishing at different steps."""
    dc = dict(max_new_tokens=32, batch_size=6, stop_strings=("\n", "."))
    shrink = generate(gemma, LOOP_PROMPTS, DecodingConfig(**dc), progress=False)
    hf = generate(gemma, LOOP_PROMPTS, DecodingConfig(**dc, loop="hf_generate"), progress=False)
    assert [g.text for g in shrink] == [g.text for g in hf]
    assert [g.n_new_tokens for g in shrink] == [g.n_new_tokens for g in hf]
    assert len({g.n_new_tokens for g in shrink}) > 1  # rows really finished at different steps


def test_the_kv_cache_keyword_is_one_the_models_forward_takes(tiny_qwen):
    """KNOWN_BUGS 36: transformers before 5.2x names the forward's cache ``past_key_values``
    and swallows an unknown ``cache=`` in **kwargs, so the loop decoded without its past."""
    import inspect

    from utils.generation import _cache_kwarg

    forward = inspect.signature(tiny_qwen.model.forward).parameters
    assert _cache_kwarg(tiny_qwen.model) in forward
