"""Downstream accuracy: by generating and reading the answer, or by likelihood over the choices.

- Generation (the default, as the commonsense papers evaluate): greedy decoding of each test
  prompt, then the task's extractor reads the answer (`the correct answer is X`, a label string,
  a number) and compares it with the reference.
- Likelihood: every choice's response text (`the correct answer is answer2`, or the label) is
  scored as `log p(response + EOS | prompt)`, summed (or averaged per token with
  `length_normalized`), and the best-scoring choice is the prediction. Needs a choice set.

Prompts longer than `max_prompt_tokens` keep BOS and their end, where the question meets the
answer (the training layout truncates the same way).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np
from flax import nnx

from slim_jax.data import CausalLayout
from slim_jax.errors import ConfigError
from slim_jax.eval.scoring import require_causal, sequence_log_likelihoods
from slim_jax.eval.tasks import DownstreamTask
from slim_jax.models.generate import bucket_length, generate
from slim_jax.tokenizer import Tokenizer

Mode = Literal["generate", "likelihood"]
MODES: tuple[str, ...] = ("generate", "likelihood")


@dataclasses.dataclass(frozen=True)
class DownstreamResult:
    """Accuracy on a task's test set, with what was predicted for each example.

    Attributes:
      accuracy: share of test examples answered correctly, in [0, 1].
      predictions: per test example, the extracted (or best-scoring) answer, None if none.
      correct: per test example, whether it was right.
      outputs: per test example, the generated text (generation) or the choices' scores joined
        as `choice=score` (likelihood), for inspection.
    """

    accuracy: float
    predictions: tuple[str | None, ...]
    correct: tuple[bool, ...]
    outputs: tuple[str, ...]


def _fit_prompt(ids: list[int], limit: int, has_bos: bool) -> list[int]:
    """At most `limit` ids: the first (BOS) kept when `has_bos`, then the end."""
    if len(ids) <= limit:
        return ids
    return ids[:1] + ids[len(ids) - limit + 1:] if has_bos else ids[len(ids) - limit:]


def generate_texts(
    model: nnx.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    max_prompt_tokens: int,
    batch_size: int = 32,
) -> list[str]:
    """Greedy continuations of `prompts`, in fixed-shape chunks so one program serves them all.

    Every chunk has `batch_size` rows (the last is filled with copies of its final prompt) and
    every prompt is padded to the bucket of `max_prompt_tokens`, so the generation compiles once.
    SLIM's dynamic merging draws fresh masks on every forward pass of the generation.

    Args:
      model: a decoder-only model for `slim_jax.models.generate` (in inference mode).
      tokenizer: encodes prompts (BOS in front) and decodes the continuations.
      prompts: the prompt texts.
      max_new_tokens: tokens generated per prompt (stops earlier at EOS).
      max_prompt_tokens: longer prompts keep BOS and their last tokens.
      batch_size: prompts per generation call.
    """
    require_causal(model, "generate_texts")
    if max_prompt_tokens < 2 or batch_size < 1:
        raise ConfigError(f"need max_prompt_tokens >= 2 and batch_size >= 1, got "
                          f"{max_prompt_tokens} and {batch_size}")
    has_bos = tokenizer.bos_id is not None
    rows = [_fit_prompt(tokenizer.encode(p, add_bos=has_bos), max_prompt_tokens, has_bos)
            for p in prompts]
    texts: list[str] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        filled = chunk + [chunk[-1]] * (batch_size - len(chunk))
        out = generate(model, filled, tokenizer=tokenizer, max_new_tokens=max_new_tokens,
                       min_bucket=bucket_length(max_prompt_tokens))
        texts.extend((out.texts or [])[:len(chunk)])
    return texts


def accuracy_by_generation(
    model: nnx.Module,
    tokenizer: Tokenizer,
    task: DownstreamTask,
    *,
    max_new_tokens: int = 16,
    max_prompt_tokens: int = 512,
    batch_size: int = 32,
) -> DownstreamResult:
    """Generate an answer for every test prompt and read it with the task's extractor.

    >>> from slim_jax.data import ByteTokenizer, Example
    >>> from slim_jax.models.llama import Llama, LlamaConfig
    >>> cfg = LlamaConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=8,
    ...                   intermediate_size=16, num_layers=1, num_heads=2, num_kv_heads=1)
    >>> task = DownstreamTask("toy", "label", train=(), test=(Example("Q", "a", answer="a"),),
    ...                       choices=(("a", "b"),))
    >>> result = accuracy_by_generation(Llama(cfg, rngs=nnx.Rngs(0)), ByteTokenizer(), task,
    ...                                 max_new_tokens=2, max_prompt_tokens=8, batch_size=1)
    >>> len(result.outputs), result.accuracy in (0.0, 1.0)
    (1, True)
    """
    texts = generate_texts(model, tokenizer, [task.prompt(e) for e in task.test],
                           max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens,
                           batch_size=batch_size)
    predictions = tuple(task.extract(text, i) for i, text in enumerate(texts))
    correct = tuple(task.is_correct(p, i) for i, p in enumerate(predictions))
    return DownstreamResult(sum(correct) / len(correct), predictions, correct, tuple(texts))


def accuracy_by_likelihood(
    model: nnx.Module,
    tokenizer: Tokenizer,
    task: DownstreamTask,
    *,
    max_length: int = 512,
    batch_size: int = 32,
    length_normalized: bool = False,
) -> DownstreamResult:
    """Score every choice's response text and predict the most likely one.

    Args:
      model, tokenizer, task: as in `accuracy_by_generation` (the task must have choice sets).
      max_length: row length of the scoring batches (prompt + response; prompts are cut from the
        start, keeping BOS, to fit).
      batch_size: rows per forward pass.
      length_normalized: compare mean per-token log-probabilities instead of sums.

    >>> from slim_jax.data import ByteTokenizer, Example
    >>> from slim_jax.models.llama import Llama, LlamaConfig
    >>> cfg = LlamaConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=8,
    ...                   intermediate_size=16, num_layers=1, num_heads=2, num_kv_heads=1)
    >>> task = DownstreamTask("toy", "label", train=(), test=(Example("Q", "a", answer="a"),),
    ...                       choices=(("a", "bb"),))
    >>> result = accuracy_by_likelihood(Llama(cfg, rngs=nnx.Rngs(0)), ByteTokenizer(), task,
    ...                                 max_length=8)
    >>> result.predictions[0] in ("a", "bb")
    True
    """
    layout = CausalLayout(tokenizer, lengths=(max_length,))
    pairs, owner = [], []
    for i, example in enumerate(task.test):
        prompt = task.prompt(example)
        for choice in task.choices[i]:
            pairs.append(layout.fit(layout.encode(prompt, task.response(choice))))
            owner.append(i)
    sums, counts = sequence_log_likelihoods(model, pairs, layout, batch_size=batch_size)
    scores = sums / np.maximum(counts, 1.0) if length_normalized else sums
    predictions, outputs, at = [], [], 0
    for i in range(len(task.test)):
        options = task.choices[i]
        mine = scores[at:at + len(options)]
        at += len(options)
        predictions.append(options[int(np.argmax(mine))])
        outputs.append(" ".join(f"{c}={s:.4f}" for c, s in zip(options, mine, strict=True)))
    correct = tuple(task.is_correct(p, i) for i, p in enumerate(predictions))
    return DownstreamResult(sum(correct) / len(correct), tuple(predictions), correct,
                            tuple(outputs))


def downstream_accuracy(
    model: nnx.Module,
    tokenizer: Tokenizer,
    task: DownstreamTask,
    *,
    mode: Mode = "generate",
    max_new_tokens: int = 16,
    max_length: int = 512,
    batch_size: int = 32,
    length_normalized: bool = False,
) -> DownstreamResult:
    """Accuracy by `mode` ("generate" or "likelihood"); `max_length` bounds prompt + answer.

    Raises:
      ConfigError: an unknown mode, likelihood on a task without choices, or `max_length` not
        above `max_new_tokens`.
    """
    if mode not in MODES:
        raise ConfigError(f"evaluation mode must be one of {MODES}, got {mode!r}")
    if mode == "likelihood":
        if task.kind == "number":
            task.response("")  # raises the named error
        return accuracy_by_likelihood(model, tokenizer, task, max_length=max_length,
                                      batch_size=batch_size, length_normalized=length_normalized)
    if max_length <= max_new_tokens + 1:
        raise ConfigError(f"max_length ({max_length}) must exceed max_new_tokens "
                          f"({max_new_tokens}) + 1 to leave room for a prompt")
    return accuracy_by_generation(model, tokenizer, task, max_new_tokens=max_new_tokens,
                                  max_prompt_tokens=max_length - max_new_tokens,
                                  batch_size=batch_size)
