"""General capability, measured the same way before and after fine-tuning, and its drop.

Two measures share one interface (`measure(model) -> {name: value}`, a `headline` name, and the
direction of each name):
- `StoryCapability`: on stories the base model writes (held-out NLL, perplexity, top-1 agreement
  and KL with the base model's next-token distribution); headline `nll`, lower is better. Built
  from the base model, so it is in-domain by construction.
- `BenchmarkCapability`: accuracy on benchmark tasks (MMLU, GSM8K, PIQA, ...); headline
  `mean_accuracy`, higher is better.

`forgetting_by_measure(capability, before, after)` is the drop of every measure (positive = worse).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from flax import nnx

from slim_jax.eval.downstream import Mode, downstream_accuracy
from slim_jax.eval.forgetting import forgetting
from slim_jax.eval.general import sample_stories, story_metrics, story_reference
from slim_jax.eval.tasks import DownstreamTask
from slim_jax.tokenizer import Tokenizer


class GeneralCapability(Protocol):
    """A general-capability measure (see the module docstring)."""

    headline: str

    def measure(self, model: nnx.Module) -> dict[str, float]: ...

    def higher_is_better(self, name: str) -> bool: ...


class StoryCapability:
    """General capability on the base model's own stories (`slim_jax.eval.general`).

    Args:
      base: the base model in inference mode (writes the stories and is the reference).
      tokenizer: its tokenizer (needs BOS).
      stories: token ids of the stories (each starting with BOS); `sample_stories` them first, or
        use `StoryCapability.sample`.
      batch_size: stories per forward pass.

    >>> from slim_jax.data import ByteTokenizer
    >>> from slim_jax.models.llama import Llama, LlamaConfig
    >>> cfg = LlamaConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=8,
    ...                   intermediate_size=16, num_layers=1, num_heads=2, num_kv_heads=1)
    >>> base = Llama(cfg, rngs=nnx.Rngs(0))
    >>> capability = StoryCapability.sample(base, ByteTokenizer(), num_stories=2,
    ...                                     max_new_tokens=8, seed=0)
    >>> before = capability.measure(base)
    >>> forgetting_by_measure(capability, before, before)["nll"]
    0.0
    """

    headline = "nll"
    LOWER_IS_BETTER = frozenset({"nll", "perplexity", "kl_to_base"})

    def __init__(self, base: nnx.Module, tokenizer: Tokenizer, stories: list[list[int]], *,
                 batch_size: int = 16) -> None:
        self.stories = stories
        length = max(len(s) for s in stories) - 1
        self.reference = story_reference(base, tokenizer, stories, max_length=length,
                                         batch_size=batch_size)

    @classmethod
    def sample(cls, base: nnx.Module, tokenizer: Tokenizer, *, num_stories: int,
               max_new_tokens: int, seed: int, temperature: float = 1.0,
               batch_size: int = 16) -> StoryCapability:
        """Sample `num_stories` stories from `base` (seeded) and build the measure on them."""
        stories = sample_stories(base, tokenizer, num_stories=num_stories,
                                 max_new_tokens=max_new_tokens, seed=seed,
                                 temperature=temperature, batch_size=batch_size)
        return cls(base, tokenizer, stories, batch_size=batch_size)

    def measure(self, model: nnx.Module) -> dict[str, float]:
        """`nll`, `perplexity`, `top1_agreement`, `kl_to_base` of `model` on the stories."""
        return story_metrics(model, self.reference)

    def higher_is_better(self, name: str) -> bool:
        return name not in self.LOWER_IS_BETTER


class BenchmarkCapability:
    """General capability as accuracy on benchmark tasks, and their mean.

    Args:
      tokenizer: the model's tokenizer.
      tasks: the benchmarks (their `test` sets are used).
      mode: "generate" or "likelihood" (tasks without choices, such as GSM8K, always generate).
      max_new_tokens: tokens generated per answer of choice/label tasks.
      number_max_new_tokens: tokens generated per answer of number tasks (a worked solution).
      max_length: prompt + answer positions.
      batch_size: prompts per call.
    """

    headline = "mean_accuracy"

    def __init__(self, tokenizer: Tokenizer, tasks: Sequence[DownstreamTask], *,
                 mode: Mode = "generate", max_new_tokens: int = 32,
                 number_max_new_tokens: int = 256, max_length: int = 1024,
                 batch_size: int = 32) -> None:
        self.tokenizer, self.tasks = tokenizer, tuple(tasks)
        self.mode, self.max_new_tokens = mode, max_new_tokens
        self.number_max_new_tokens = number_max_new_tokens
        self.max_length, self.batch_size = max_length, batch_size

    def measure(self, model: nnx.Module) -> dict[str, float]:
        """Accuracy per task name, and `mean_accuracy` over the tasks."""
        scores = {}
        for task in self.tasks:
            number = task.kind == "number"
            result = downstream_accuracy(
                model, self.tokenizer, task, mode="generate" if number else self.mode,
                max_new_tokens=self.number_max_new_tokens if number else self.max_new_tokens,
                max_length=self.max_length, batch_size=self.batch_size)
            scores[task.name] = result.accuracy
        scores[self.headline] = sum(scores.values()) / max(len(scores), 1)
        return scores

    def higher_is_better(self, name: str) -> bool:
        return True


def forgetting_by_measure(capability: GeneralCapability, before: dict[str, float],
                          after: dict[str, float]) -> dict[str, float]:
    """The drop of every measure from `before` to `after` (positive = got worse)."""
    return {name: forgetting(before[name], after[name],
                             higher_is_better=capability.higher_is_better(name))
            for name in before}
