"""The ONE instruction/response format, shared by data generation, SFT, DPO and evaluation.

A base model has never seen a chat template, so the project speaks to it in plain completion
style:

    Instruction: <instruction>
    Response: <response>

Few-shot prompts chain such blocks separated by a blank line. The end of a response is marked
by the start of the next block (``END_OF_RESPONSE_MARKER``), which a base model produces by
itself when it has finished an answer in a few-shot prompt; trained models end with the
tokenizer's EOS instead. No artificial marker ("###", "<END>") is used: such strings leak into
responses (the system this replaces leaked "###" into 38% of its records).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

INSTRUCTION_HEADER = "Instruction:"
RESPONSE_HEADER = "Response:"
EXAMPLE_SEPARATOR = "\n\n"
# A response ends where the model starts the next example. Matched as a whole string.
END_OF_RESPONSE_MARKER = "\n" + INSTRUCTION_HEADER
# Stop strings every generator uses for responses, in every arm (EOS is always a stop too).
RESPONSE_STOP_STRINGS: tuple[str, ...] = (END_OF_RESPONSE_MARKER,)


def format_prompt(instruction: str) -> str:
    """The prompt for one instruction, ending right after ``Response:`` (no trailing space).

    The completion starts with a space (" " + response): the tokenizer keeps the space inside
    the first response token, which is what the model sees at inference.
    """
    instruction = instruction.strip()
    if not instruction:
        raise ValueError("instruction is empty")
    return f"{INSTRUCTION_HEADER} {instruction}\n{RESPONSE_HEADER}"


def format_completion(response: str) -> str:
    """The completion string a model is trained to produce (EOS is appended by the trainer)."""
    response = response.strip()
    if not response:
        raise ValueError("response is empty")
    return " " + response


def format_example(instruction: str, response: str) -> str:
    """One complete few-shot example block (no trailing separator)."""
    return format_prompt(instruction) + format_completion(response)


def format_few_shot_prompt(examples: Sequence[tuple[str, str]], instruction: str) -> str:
    """``examples`` as (instruction, response) pairs, then the open prompt for ``instruction``."""
    blocks = [format_example(i, r) for i, r in examples]
    blocks.append(format_prompt(instruction))
    return EXAMPLE_SEPARATOR.join(blocks)


def clean_response(completion: str, stop_strings: Iterable[str] = RESPONSE_STOP_STRINGS) -> str:
    """The response text of a raw completion: cut at the first stop string, whitespace stripped."""
    cut = len(completion)
    for stop in stop_strings:
        idx = completion.find(stop)
        if idx != -1:
            cut = min(cut, idx)
    return completion[:cut].strip()


def marker_leaked(response: str) -> bool:
    """True when a cleaned response still contains format scaffolding (a QC failure)."""
    return any(h in response for h in (INSTRUCTION_HEADER, "\n" + RESPONSE_HEADER))
