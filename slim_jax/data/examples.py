"""Instruction/response examples and the templates that turn them into (prompt, response) text.

Every loader returns `Example`s; a `PromptTemplate` decides how the instruction (and optional input)
read as the prompt the model is conditioned on, and how the response reads as the text it is trained
to write. The loss later covers the response only (see `slim_jax.data.layout`).
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from slim_jax.errors import ConfigError


@dataclass(frozen=True)
class Example:
    """One supervised example.

    Attributes:
      instruction: the task text (a question, a T0 prompt, a BBH prompt).
      response: the text the model should produce (trained on, scored by likelihood).
      input: optional context that some sets keep apart from the instruction ("" when none).
      answer: the short answer an evaluation compares against (commonsense `answer`, the GSM8K
        number after `#### `, a class label); None when the response itself is the answer.
    """

    instruction: str
    response: str
    input: str = ""
    answer: str | None = None


def _check_fields(name: str, template: str, allowed: set[str]) -> None:
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as err:
        raise ConfigError(f"template {name}={template!r} is not a valid format string: "
                          f"{err}") from err
    unknown = fields - allowed
    if unknown:
        raise ConfigError(f"template {name}={template!r} uses unknown field(s) {sorted(unknown)}; "
                          f"accepted: {sorted('{' + a + '}' for a in allowed)} (double braces for "
                          "literal ones)")


@dataclass(frozen=True)
class PromptTemplate:
    """How an `Example` reads as prompt text and response text.

    Attributes:
      prompt: format string of the prompt when `example.input` is empty; field `{instruction}`.
      prompt_with_input: format string when `example.input` is set; fields `{instruction}` and
        `{input}`.
      response: format string of the response; field `{response}`.

    >>> PromptTemplate(prompt="Q: {instruction}\\nA:", response=" {response}").render(
    ...     Example("2+2?", "4"))
    ('Q: 2+2?\\nA:', ' 4')
    """

    prompt: str = "{instruction}"
    prompt_with_input: str = "{instruction}\n\n{input}"
    response: str = "{response}"

    def __post_init__(self) -> None:
        _check_fields("prompt", self.prompt, {"instruction"})
        _check_fields("prompt_with_input", self.prompt_with_input, {"instruction", "input"})
        _check_fields("response", self.response, {"response"})

    def render(self, example: Example) -> tuple[str, str]:
        """`(prompt_text, response_text)` of `example`."""
        if example.input:
            prompt = self.prompt_with_input.format(instruction=example.instruction,
                                                   input=example.input)
        else:
            prompt = self.prompt.format(instruction=example.instruction)
        return prompt, self.response.format(response=example.response)


# The instruction text as it is: T0 prompts already end in "\n", BBH prompts in "A:".
PLAIN = PromptTemplate()

# The Alpaca template that LLM-Adapters (the source of the commonsense sets) fine-tunes with.
ALPACA = PromptTemplate(
    prompt=(
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
    ),
    prompt_with_input=(
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    ),
)
