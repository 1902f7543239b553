"""Evaluation: downstream accuracy, general capability, forgetting.

- `tasks`, `commonsense`: what is learned and tested (`DownstreamTask`: T0 classification
  templates, commonsense sets from the data folder or the hub, GSM8K, MMLU).
- `answers`: reading answers out of generated text.
- `downstream`: accuracy by generation (default) or by likelihood over the choices.
- `general`: general capability on the model's own domain (stories the base model wrote:
  held-out likelihood, agreement with the base model's next-token distribution).
- `capability`: general capability before and after fine-tuning (stories or benchmarks), and
  forgetting per measure.
- `forgetting`: the drop of a measure, and mean / std over seeds.
- `scoring`: inference mode and jitted batch evaluation shared by the above.

>>> from slim_jax.eval import forgetting, extract_label
>>> forgetting(0.8, 0.7) > 0, extract_label(" Positive", ["Negative", "Positive"])
(True, 'Positive')
"""

from slim_jax.eval.answers import (
    choices_from_instruction,
    extract_choice,
    extract_label,
    extract_number,
    normalize,
    same_number,
)
from slim_jax.eval.capability import (
    BenchmarkCapability,
    GeneralCapability,
    StoryCapability,
    forgetting_by_measure,
)
from slim_jax.eval.commonsense import (
    HUB_SETS,
    choice_example,
    commonsense_task,
    load_commonsense_split,
    mmlu_task,
    read_hub_set,
)
from slim_jax.eval.downstream import (
    MODES,
    DownstreamResult,
    accuracy_by_generation,
    accuracy_by_likelihood,
    downstream_accuracy,
    generate_texts,
)
from slim_jax.eval.forgetting import forgetting, mean_std
from slim_jax.eval.general import (
    STORY_METRICS,
    StoryReference,
    sample_stories,
    story_metrics,
    story_reference,
)
from slim_jax.eval.scoring import (
    apply_model,
    sequence_log_likelihoods,
    target_log_probs,
)
from slim_jax.eval.tasks import (
    DownstreamTask,
    gsm8k_task,
    shorten_passage,
    subsample,
    subsample_indices,
    t0_classification_task,
    template_lines,
)

__all__ = [
    "HUB_SETS",
    "MODES",
    "STORY_METRICS",
    "BenchmarkCapability",
    "DownstreamResult",
    "DownstreamTask",
    "GeneralCapability",
    "StoryCapability",
    "StoryReference",
    "accuracy_by_generation",
    "accuracy_by_likelihood",
    "apply_model",
    "choice_example",
    "choices_from_instruction",
    "commonsense_task",
    "downstream_accuracy",
    "extract_choice",
    "extract_label",
    "extract_number",
    "forgetting",
    "forgetting_by_measure",
    "generate_texts",
    "gsm8k_task",
    "load_commonsense_split",
    "mean_std",
    "mmlu_task",
    "normalize",
    "read_hub_set",
    "same_number",
    "sample_stories",
    "sequence_log_likelihoods",
    "shorten_passage",
    "story_metrics",
    "story_reference",
    "subsample",
    "subsample_indices",
    "t0_classification_task",
    "target_log_probs",
    "template_lines",
]
