"""The base-model critic's judging documents (pure): headers, questions, demonstrations and the
prompt builders of every judge mode, with the version recorded next to each label.

``pair_prompt`` (A/B, both orders), ``instruction_prompt`` (is this a clear instruction?),
``response_prompt`` (pointwise Yes/No) end right before the answer token; ``pmi_prefix`` and
``pmi_completion`` are the context and the scored text of the ``pmi`` judge. The model calls
that read the answers are in ``utils.critic``.
"""

from __future__ import annotations

# Bump whenever a header, a demonstration or a question below changes: it is recorded in every
# judged record, and ``utils.critic.judge_prompt_id`` hashes the exact text.
PROMPT_VERSION = "critic-v3"  # v2: pointwise response judge; v3: pmi response judge

ANSWER_A, ANSWER_B = " A", " B"
ANSWER_YES, ANSWER_NO = " Yes", " No"

PAIR_HEADER = (
    "Each instruction below was given to two assistants. A careful reviewer compared the two "
    "responses and wrote down which one follows the instruction better: correct, on topic, "
    "and in exactly the form the instruction asks for."
)
PAIR_QUESTION = "Which response follows the instruction better? Answer:"

INSTRUCTION_HEADER_TEXT = (
    "Requests sent to a helpful assistant, each checked by a reviewer. The reviewer answers "
    "Yes when the request is a clear, complete instruction or question that an assistant can "
    "answer, and No when it is cut off, garbled, not a request at all, or already an answer."
)
INSTRUCTION_QUESTION = "Is this a clear, complete instruction? Answer:"

# Demonstrations written for this project. Topics avoid the evaluation tasks
# (utils.eval_prompts.TASKS) and the critic check set (utils.critic_checkset). The better
# response alternates A, B, A, B ... so every even-length prefix is balanced.
PAIR_SHOTS: tuple[tuple[str, str, str, str], ...] = (
    ('Write the word "lamp" backwards.', "pmal", "lamp", "A"),
    (
        "Give two reasons to learn to swim. Use a numbered list.",
        "Swimming is fun.",
        "1. It keeps you safe near water.\n2. It is good exercise.",
        "B",
    ),
    (
        "Reply in lowercase only: what does a lighthouse do?",
        "a lighthouse shines a light to warn ships away from rocks.",
        "A Lighthouse Shines A Light To Warn Ships Away From Rocks.",
        "A",
    ),
    ("What is 9 minus 4?", "6", "5", "B"),
    (
        "Describe a kite in one sentence.",
        "A kite is a light frame covered in paper or cloth that flies on the wind at the end of "
        "a string.",
        "Kites. They fly. Some have tails. Children like them. They can break.",
        "A",
    ),
    ("Name a musical instrument that has strings.", "A drum.", "A violin.", "B"),
    (
        "Answer with yes or no: is a volcano hot inside?",
        "Yes.",
        "Volcanoes are openings in the crust of a planet, and many of them are found along the "
        "edges of tectonic plates.",
        "A",
    ),
    (
        "Explain in two sentences why owls hunt at night.",
        "Owl.",
        "Owls hunt at night because the small animals they eat are active then. Their large "
        "eyes and sharp hearing let them find prey in the dark.",
        "B",
    ),
)
INSTRUCTION_SHOTS: tuple[tuple[str, str], ...] = (
    ("Give two tips for keeping a teapot clean.", "Yes"),
    ("What is the best way to", "No"),
    ("Explain why bread goes stale.", "Yes"),
    ("blue quickly the of table run under", "No"),
    ("Write a haiku about a quiet harbor.", "Yes"),
    ("Sure! Here is a short story about a dragon who learns to fly.", "No"),
    ("How many minutes are in three hours?", "Yes"),
    ("1997", "No"),
)

PAIR_MODES = ("pmi", "pointwise", "pairwise")

# Pointwise response judge wordings: id -> (header or "", question). The id is recorded with
# every label; wording and shot count were chosen on the DEV split of the check set.
POINTWISE_PROMPTS: dict[str, tuple[str, str]] = {
    "exact-v1": (
        "Each instruction below was given to an assistant. A careful reviewer read the response "
        "and wrote Yes if it follows the instruction exactly (correct, on topic, and in exactly "
        "the form the instruction asks for) or No if it does not.",
        "Does the response follow the instruction exactly? Answer:",
    ),
    "grader-v1": (
        "Answer key of a strict grader. A response passes only if it is correct and obeys every "
        "rule in its instruction: length, format, letter case, and words to use or avoid.",
        "Does the response pass? Answer:",
    ),
}


def _response_shots() -> tuple[tuple[str, str, str], ...]:
    # Contrastive: each A/B demonstration gives its good response (Yes) and its bad one (No) for
    # the SAME instruction, so a demonstration pair differs only in whether it follows. Pair k
    # is shown Yes-then-No for even k, No-then-Yes for odd k: every prefix of 4 is balanced.
    shots: list[tuple[str, str, str]] = []
    for k, (ins, a, b, better) in enumerate(PAIR_SHOTS):
        good, bad = (a, b) if better == "A" else (b, a)
        pair = [(ins, good, "Yes"), (ins, bad, "No")]
        shots.extend(pair if k % 2 == 0 else pair[::-1])
    return tuple(shots)


RESPONSE_SHOTS: tuple[tuple[str, str, str], ...] = _response_shots()


# --------------------------------------------------------------------------------------------
# Prompts (pure).


def require_text(text: str, what: str) -> str:
    """``text`` stripped; a non-string or blank text is refused (nothing to judge)."""
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a string, got {type(text).__name__}")
    text = text.strip()
    if not text:
        raise ValueError(f"{what} is empty; the critic cannot judge an empty text")
    return text


def _pair_block(instruction: str, response_a: str, response_b: str) -> str:
    return f"Instruction: {instruction}\nResponse A: {response_a}\nResponse B: {response_b}\n"


def pair_prompt(instruction: str, response_a: str, response_b: str, n_shots: int) -> str:
    """The A/B judging document ending right before the answer token (" A" or " B")."""
    instruction = require_text(instruction, "instruction")
    response_a = require_text(response_a, "response A")
    response_b = require_text(response_b, "response B")
    blocks = [PAIR_HEADER]
    for ins, a, b, better in PAIR_SHOTS[:n_shots]:
        blocks.append(_pair_block(ins, a, b) + f"{PAIR_QUESTION} {better}")
    blocks.append(_pair_block(instruction, response_a, response_b) + PAIR_QUESTION)
    return "\n\n".join(blocks)


def instruction_prompt(instruction: str, n_shots: int) -> str:
    """The Yes/No judging document ending right before the answer token (" Yes" or " No")."""
    instruction = require_text(instruction, "instruction")
    blocks = [INSTRUCTION_HEADER_TEXT]
    for ins, verdict in INSTRUCTION_SHOTS[:n_shots]:
        blocks.append(f"Instruction: {ins}\n{INSTRUCTION_QUESTION} {verdict}")
    blocks.append(f"Instruction: {instruction}\n{INSTRUCTION_QUESTION}")
    return "\n\n".join(blocks)


def response_prompt(instruction: str, response: str, n_shots: int, prompt_id: str) -> str:
    """The pointwise judging document for ONE response, ending right before " Yes"/" No".

    Each block is the project's one format (``format_example``) followed by the question."""
    from utils.response_format import EXAMPLE_SEPARATOR, format_example

    if prompt_id not in POINTWISE_PROMPTS:
        raise ValueError(
            f"unknown pointwise prompt {prompt_id!r}; known: {sorted(POINTWISE_PROMPTS)}"
        )
    if not 0 <= n_shots <= len(RESPONSE_SHOTS):
        raise ValueError(f"n_shots must be in 0..{len(RESPONSE_SHOTS)}, got {n_shots}")
    instruction = require_text(instruction, "instruction")
    response = require_text(response, "response")
    header, question = POINTWISE_PROMPTS[prompt_id]
    blocks = [header] if header else []
    for ins, resp, verdict in RESPONSE_SHOTS[:n_shots]:
        blocks.append(f"{format_example(ins, resp)}\n{question} {verdict}")
    blocks.append(f"{format_example(instruction, response)}\n{question}")
    return EXAMPLE_SEPARATOR.join(blocks)


def _good_demonstrations(n_shots: int) -> list[tuple[str, str]]:
    return [(ins, a if better == "A" else b) for ins, a, b, better in PAIR_SHOTS[:n_shots]]


def pmi_prefix(instruction: str | None, n_shots: int) -> str:
    """The pmi judge's context: ``n_shots`` demonstrations (the good responses of
    ``PAIR_SHOTS``) in the project's one format, then the open prompt for ``instruction``;
    ``None`` gives the NULL context, the same document with an empty instruction line."""
    from utils.response_format import (
        EXAMPLE_SEPARATOR,
        INSTRUCTION_HEADER,
        RESPONSE_HEADER,
        format_example,
        format_prompt,
    )

    if not 0 <= n_shots <= len(PAIR_SHOTS):
        raise ValueError(f"n_shots must be in 0..{len(PAIR_SHOTS)}, got {n_shots}")
    blocks = [format_example(i, r) for i, r in _good_demonstrations(n_shots)]
    if instruction is None:
        blocks.append(f"{INSTRUCTION_HEADER}\n{RESPONSE_HEADER}")
    else:
        blocks.append(format_prompt(require_text(instruction, "instruction")))
    return EXAMPLE_SEPARATOR.join(blocks)


def pmi_completion(response: str) -> str:
    """The scored text: the response as the model would produce it, then the end-of-response
    marker, so stopping where the instruction says to stop is part of the score."""
    from utils.response_format import END_OF_RESPONSE_MARKER, format_completion

    return format_completion(require_text(response, "response")) + END_OF_RESPONSE_MARKER
