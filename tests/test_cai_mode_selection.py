"""cai.mode chosen by measurement (utils/cai_mode_selection.py): the labels' margins on a tiny
real model (properties every correct label has) and the choice rule."""

from __future__ import annotations

import pytest

from utils.cai_mode_selection import compare_modes, contrastive_margins, revise_margins
from utils.constitution_config import CAIConfig
from utils.constitution_eval import PrincipleItem, load_principle_items
from utils.constitution_prompts import load_constitution


def _items() -> list[PrincipleItem]:
    return [it for it in load_principle_items() if it.split == "dev"][:4]


def _swapped(items: list[PrincipleItem]) -> list[PrincipleItem]:
    return [PrincipleItem(**{**it.__dict__, "follows": it.breaks, "breaks": it.follows})
            for it in items]  # fmt: skip


@pytest.mark.parametrize("margins_of", [contrastive_margins, revise_margins])
def test_a_label_is_antisymmetric_and_neutral_on_identical_responses(tiny_qwen, margins_of):
    constitution, cfg = load_constitution(), CAIConfig()
    items = _items()
    m = margins_of(tiny_qwen, items, constitution, cfg)
    back = margins_of(tiny_qwen, _swapped(items), constitution, cfg)
    assert len(m) == len(items) and all(x != 0 for x in m)
    # Swapping the two responses flips the preference exactly (both orders are averaged).
    assert back == pytest.approx([-x for x in m], abs=1e-5)
    same = [PrincipleItem(**{**it.__dict__, "breaks": it.follows}) for it in items]
    assert margins_of(tiny_qwen, same, constitution, cfg) == pytest.approx([0.0] * 4, abs=1e-6)


def test_the_more_accurate_label_is_chosen_and_a_tie_goes_to_contrastive():
    r = compare_modes({"contrastive": [0.2, -0.1, 0.3, -0.4], "revise": [0.1, 0.1, 0.1, -0.1]})
    assert r["arms"]["contrastive"]["successes"] == 2 and r["arms"]["revise"]["successes"] == 3
    assert r["chosen"] == "revise"
    assert r["mcnemar"]["n_a_only"] == 0 and r["mcnemar"]["n_b_only"] == 1
    tie = compare_modes({"contrastive": [0.2, -0.1], "revise": [-0.1, 0.3]})
    assert tie["chosen"] == "contrastive"
    # A margin of exactly 0 is not a right label.
    assert (
        compare_modes({"contrastive": [0.0], "revise": [0.0]})["arms"]["revise"]["successes"] == 0
    )
