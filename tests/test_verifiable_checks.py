"""Checkers against hand-written responses; IFEval strict/loose scoring; registry and conflicts."""

from __future__ import annotations

import json
import random
import re

import pytest

from utils import instruction_checkers as ic
from utils import verifiable_checks as vc

# (instruction id, kwargs, responses that pass, responses that fail), all judged by hand.
CASES = [
    (
        "length_constraints:number_words",
        {"num_words": 5, "relation": "at most"},
        ["The ocean is deep.", "one two three four five"],
        ["one two three four five six", "The ocean is deep and very blue."],
    ),
    (
        "length_constraints:number_words",
        {"num_words": 5, "relation": "less than"},
        ["one two three four", "It's big."],  # "It's" is two \w+ tokens: It, s
        ["one two three four five", "a b c d e f g"],
    ),
    (
        "length_constraints:number_words",
        {"num_words": 3, "relation": "at least"},
        ["one two three", "Well-known fact."],  # Well, known, fact
        ["one two", "..."],
    ),
    (
        "length_constraints:number_sentences",
        {"num_sentences": 2, "relation": "exactly"},
        ["The sea is big. It is blue!", "Dr. Smith swam 3.5 km. Then he rested."],
        ["One sentence only.", "One. Two. Three."],
    ),
    (
        "length_constraints:number_sentences",
        {"num_sentences": 2, "relation": "at most"},
        ["Just one.", "First one. Second one?"],
        ["A. B is here. C is there. D too.", "One. Two! Three?"],
    ),
    (
        "length_constraints:number_paragraphs",
        {"num_paragraphs": 2},
        ["First part.\n\nSecond part.", "First part.\n***\nSecond part.", "A\n\n\n  \nB"],
        ["Only one paragraph here.", "A\n\nB\n\nC", "A *** *** B"],
    ),
    (
        "length_constraints:one_word",
        {},
        ["Jupiter", "Blue.", '"Calm"'],
        ["Two words", "ice-cream", "!!!"],
    ),
    (
        "change_case:english_capital",
        {},
        ["THE OCEAN IS BLUE.", "HELLO, WORLD 123!"],
        ["The ocean is blue.", "ALL CAPS except this"],
    ),
    (
        "change_case:english_lowercase",
        {},
        ["the ocean is blue.", "p.s. all small, 42!"],
        ["The ocean is blue.", "all lowercase but one: X"],
    ),
    (
        "keywords:existence",
        {"keywords": ["water", "friend"]},
        ["Water is my best FRIEND.", "My friend drinks waterfalls of tea."],  # substring, as IFEval
        ["Water is wet.", "A friend in need."],
    ),
    (
        "keywords:forbidden_words",
        {"forbidden_words": ["very"]},
        ["It is quite big.", "Every wave counts."],  # \bvery\b does not match inside "Every"
        ["It is very big.", "VERY big indeed."],
    ),
    (
        "detectable_format:number_bullet_lists",
        {"num_bullets": 3},
        ["* one\n* two\n* three", "Intro:\n- a\n- b\n  - c"],
        ["* one\n* two", "- a\n- b\n- c\n- d", "** bold\n** bold\n** bold"],
    ),
    (
        "detectable_format:json_format",
        {"keys": ["topic", "answer"]},
        ['{"topic": "sea", "answer": "blue"}', '```json\n{"answer": 1, "topic": null}\n```'],
        ['{"topic": "sea"}', "topic: sea, answer: blue", '["topic", "answer"]'],
    ),
    (
        "detectable_format:json_format",
        {},
        ['{"a": 1}', '```\n{"x": [1, 2]}\n```'],
        ["5", '"ocean"', "{'a': 1}"],  # bare values are not objects; single quotes not JSON
    ),
    (
        "detectable_format:number_highlighted_sections",
        {"num_highlights": 2},
        ["The *sea* is *blue*.", "**Deep** water and *cold* nights."],
        ["Only *one* here.", "Empty * * and ** ** do not count, nor *this\nacross lines*."],
    ),
    (
        "detectable_format:title",
        {},
        ["<<Ocean Song>>\nThe sea sings.", "Here: <<a>>"],
        ["No title here.", "<< >> blank title", "<<broken\ntitle>>"],
    ),
    (
        "detectable_content:number_placeholders",
        {"num_placeholders": 2},
        ["Dear [name], see you at [place].", "[a][b][c]"],
        ["Dear [name], see you soon.", "Dear (name) at {place}."],
    ),
    (
        "detectable_content:postscript",
        {"postscript_marker": "P.S."},
        ["Hello.\nP.S. Bring water.", "hello. p. s. see you"],
        ["Hello.\nPS bring water.", "Hello. P.P.S later"],
    ),
    (
        "startend:start_checker",
        {"start_phrase": "In short"},
        ["In short, the sea is big.", '"in short the sea is big"'],
        ["The sea, in short, is big.", "Short answer: big."],
    ),
    (
        "startend:end_checker",
        {"end_phrase": "Any other questions?"},
        ["The sea is blue. Any other questions?", '"It is blue. any other questions?"'],
        ["Any other questions? The sea is blue.", "The sea is blue. Any other questions"],
    ),
    (
        "startend:quotation",
        {},
        ['"The sea is blue."', '"a"'],
        ['"', "The sea is blue.", '"The sea is blue.'],
    ),
    (
        "punctuation:no_comma",
        {},
        ["The sea is big and blue.", "No commas here; only semicolons."],
        ["The sea is big, blue.", "a,b"],
    ),
    (
        "combination:repeat_prompt",
        {"prompt_to_repeat": "Describe the ocean."},
        ["Describe the ocean. The ocean is vast.", "describe the ocean. It is big."],
        ["The ocean is vast. Describe the ocean.", "Describe the sea. It is vast."],
    ),
]


@pytest.mark.parametrize(("instruction_id", "kwargs", "good", "bad"), CASES)
def test_checker_on_hand_written_responses(instruction_id, kwargs, good, bad):
    assert len(good) >= 2 and len(bad) >= 2
    for response in good:
        assert vc.check_instruction(instruction_id, response, kwargs), response
    for response in bad:
        assert not vc.check_instruction(instruction_id, response, kwargs), response


def test_every_registered_type_has_cases():
    assert len(vc.INSTRUCTION_TYPES) >= 12
    assert {c[0] for c in CASES} == set(vc.INSTRUCTION_TYPES)


def test_count_words_exact():
    assert ic.count_words("Hello, world! It's 3.5 km.") == 7
    assert ic.count_words("") == 0
    assert ic.count_words("snake_case counts once") == 3


def test_count_sentences_exact():
    assert ic.count_sentences("One. Two! Three?") == 3
    assert ic.count_sentences("Mr. Smith paid $3.50 at the U.S. shop. He left.") == 2
    assert ic.count_sentences("No final punctuation") == 1
    assert ic.count_sentences("Wait... what?") == 2
    assert ic.count_sentences("") == 0
    assert ic.split_into_sentences("Hi there. How are you?") == ["Hi there.", "How are you?"]


def test_counts_exact():
    assert ic.count_bullets("* a\n- b\n** c\n***\n  * d\n-5 degrees") == 4
    assert ic.count_highlights("*a* **b** * * *c\nd*") == 2
    assert ic.count_paragraphs("a\n\nb *** c") == 3
    assert ic.count_paragraphs("*** a ***") == 1
    assert ic.count_paragraphs("a *** *** b") is None


def test_empty_response_never_follows():
    # IFEval strict requires response.strip(): even "no commas" fails on an empty answer.
    assert not vc.check_instruction("punctuation:no_comma", "", {})
    assert not vc.check_instruction("keywords:forbidden_words", "  ", {"forbidden_words": ["a"]})
    assert not vc.check_instruction_loose("punctuation:no_comma", "", {})


def test_loose_variants_in_ifeval_order():
    response = "Sure:\n*the* sea\nBye"
    assert vc.loose_variants(response) == [
        "Sure:\n*the* sea\nBye",
        "Sure:\nthe sea\nBye",
        "*the* sea\nBye",
        "Sure:\n*the* sea",
        "*the* sea",
        "the sea\nBye",
        "Sure:\nthe sea",
        "the sea",
    ]


@pytest.mark.parametrize(
    ("instruction_id", "kwargs", "response"),
    [
        # A capitalised preamble line: only the first-line-removed variant is lowercase.
        ("change_case:english_lowercase", {}, "Sure! Here it is:\nthe ocean is big and blue."),
        # A sign-off after the required ending: only the last-line-removed variant ends right.
        ("startend:end_checker", {"end_phrase": "That is all."}, "It is blue. That is all.\nBye!"),
        # Markdown bold around the start phrase: only the '*'-removed variants start with it.
        ("startend:start_checker", {"start_phrase": "In short"}, "**In short** it is blue."),
    ],
)
def test_loose_passes_where_strict_fails(instruction_id, kwargs, response):
    assert not vc.check_instruction(instruction_id, response, kwargs)
    assert vc.check_instruction_loose(instruction_id, response, kwargs)


def test_loose_still_fails_a_real_violation():
    # The middle line keeps a capital in every variant.
    response = "line one\nLine Two\nline three"
    assert not vc.check_instruction_loose("change_case:english_lowercase", response, {})


def test_evaluate_and_accuracies_hand_computed():
    ids = ["change_case:english_lowercase", "punctuation:no_comma"]
    kwargs = [{}, {}]
    assert vc.evaluate_strict(ids, kwargs, "Hello\nthe sea is blue") == [False, True]
    assert vc.evaluate_loose(ids, kwargs, "Hello\nthe sea is blue") == [True, True]
    results = [[True, True], [True, False], [False]]
    assert vc.prompt_level_accuracy(results) == pytest.approx(1 / 3)
    assert vc.instruction_level_accuracy(results) == pytest.approx(3 / 5)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown instruction id 'nope'"):
        vc.check_instruction("nope", "text", {})
    with pytest.raises(ValueError, match="relation must be one of"):
        ic.check_number_words("a b", num_words=3, relation="about")
    with pytest.raises(ValueError, match="num_bullets must be a positive int"):
        ic.check_number_bullets("* a", num_bullets=0)
    with pytest.raises(ValueError, match="keywords must be a list"):
        ic.check_keywords_existence("a", keywords="water")
    with pytest.raises(ValueError, match="length_constraints:number_words: bad kwargs"):
        vc.check_instruction("length_constraints:number_words", "a b", {"n": 3})
    with pytest.raises(ValueError, match="2 instruction_ids but 1 kwargs"):
        vc.evaluate_strict(["punctuation:no_comma", "startend:quotation"], [{}], "x")
    with pytest.raises(ValueError, match="no prompts"):
        vc.prompt_level_accuracy([])
    with pytest.raises(ValueError, match="no instructions"):
        vc.instruction_level_accuracy([[]])
    with pytest.raises(ValueError, match="template_index 5 out of range"):
        vc.describe("punctuation:no_comma", {}, 5)


def test_samplers_and_templates_produce_usable_instructions():
    rng = random.Random(0)
    task = "Describe the ocean."
    for type_id, spec in vc.INSTRUCTION_TYPES.items():
        for _ in range(20):
            kwargs = spec.sample_kwargs(rng, task)
            assert json.loads(json.dumps(kwargs)) == kwargs, type_id  # lists, not tuples
            vc.check_instruction(type_id, "Some answer text.", kwargs)  # kwargs accepted
            for index in range(len(spec.templates)):
                text = vc.describe(type_id, kwargs, index)
                assert "{" not in text.replace("{place}", "") and "}" not in text, text
                assert "\n" not in text, text  # one-line instructions in the prompt format
    text = vc.describe("keywords:existence", {"keywords": ["water", "light"]})
    assert text == 'Include the keywords "water" and "light" in your answer.'


def test_samplers_avoid_words_of_the_task():
    rng = random.Random(1)
    for _ in range(200):
        kw = vc.INSTRUCTION_TYPES["keywords:existence"].sample_kwargs(rng, "Water and light.")
        assert not {"water", "light"} & set(kw["keywords"])
        fw = vc.INSTRUCTION_TYPES["keywords:forbidden_words"].sample_kwargs(rng, "Very good.")
        assert fw["forbidden_words"][0] not in ("very", "good")


def test_parameter_pools_do_not_fight_each_other():
    assert not set(vc.KEYWORDS) & set(vc.FORBIDDEN_WORDS)
    for phrase in vc.START_PHRASES + vc.END_PHRASES:
        assert "," not in phrase  # compatible with punctuation:no_comma
        for word in vc.FORBIDDEN_WORDS:
            assert not re.search(rf"\b{word}\b", phrase, flags=re.IGNORECASE), (word, phrase)


def test_conflict_table():
    ids = set(vc.INSTRUCTION_TYPES)
    for pair in vc.CONFLICTS:
        assert len(pair) == 2 and pair <= ids
    assert not vc.compatible(["change_case:english_lowercase", "change_case:english_capital"])
    assert not vc.compatible(
        ["length_constraints:one_word", "detectable_format:number_bullet_lists"]
    )
    assert not vc.compatible(
        ["detectable_format:json_format", "detectable_format:number_bullet_lists"]
    )
    assert not vc.compatible(["combination:repeat_prompt", "punctuation:no_comma"])
    assert not vc.compatible(["punctuation:no_comma", "punctuation:no_comma"])
    assert vc.compatible(["change_case:english_lowercase", "punctuation:no_comma"])
    assert vc.compatible(["detectable_format:json_format", "keywords:existence"])
    for other in ids - vc.EXCLUSIVE_TYPES:
        assert not vc.compatible(["combination:repeat_prompt", other])
