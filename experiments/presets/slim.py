"""Configuration of `python -m experiments.slim_finetune`, and its named presets.

The experiment's config is a tree of frozen dataclasses (`SlimExperiment`), every field a flag of
the command line (`experiments.cli`). The adapter of the full SLIM method is the library's
own `SlimConfig` and the training run its `TrainConfig`, so their fields are overridable as they
are (`--slim.top-k 1`, `--train.optimizer.learning-rate 1e-3`).

Presets:
- `cpu` (the default): the real pretrained TinyStories model (llama2.c `stories260K`, 260K
  parameters) learning AG News topic classification (Business vs Science and technology) from
  all 7 of its T0 templates; general capability on stories the base model writes. Sized to run
  all six methods over three seeds in minutes on a laptop CPU.
- `pod_multi`: the paper's multi-dataset run: an 8B Llama-3-class model (OpenChat-3.6, the
  paper's OpenChat-8B family; a hub id or local folder) on OpenBookQA + SIQA + BoolQ, forgetting
  on MMLU, GSM8K and PIQA; 2 epochs, batch 16 (the paper's), layers scanned; the mesh pairs
  chips for tensor parallelism and shards over the pairs (`fsdp=-1, tensor=2`), so the 16 rows
  split over the 16 pairs of the documented topology, a v5p-64 (32 chips; benchmarks/POD.md).
- `pod_csqa`, `pod_hellaswag`, `pod_winogrande`, `pod_arc_e`, `pod_arc_c`: the paper's single-data-
  set runs, otherwise as `pod_multi`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from experiments.presets.common import ModelSpec
from experiments.slim_methods import METHODS
from slim_jax.errors import ConfigError
from slim_jax.nn import SlimConfig
from slim_jax.parallel import MeshConfig
from slim_jax.train import OptimizerConfig, TrainConfig

AG_NEWS_TEMPLATES: tuple[str, ...] = (
    "ag_news_classify",
    "ag_news_classify_question_first",
    "ag_news_classify_with_choices",
    "ag_news_classify_with_choices_question_first",
    "ag_news_recommend",
    "ag_news_which_section",
    "ag_news_which_section_choices",
)
ALL_PROJECTIONS = r"(q|k|v|o|gate|up|down)_proj$"
POD_MODEL = "openchat/openchat-3.6-8b-20240522"


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """The downstream task fine-tuning learns.

    Attributes:
      kind: "t0" (T0 classification templates of one source, split by item), "commonsense"
        (LLM-Adapters sets mixed; from the data folder, else the hub) or "gsm8k".
      names: the templates (t0) or sets (commonsense); ignored for gsm8k.
      test_fraction: t0: share of items held out for test, per label.
      split_seed: seed of the split and of any subsample.
      max_train: cap on training examples (per set for commonsense); none for all.
      max_test: cap on test examples (per set for commonsense); none for all.
      max_passage_words: t0: keep the first this many words of each prompt's passage (the
        article; its title and lead carry the topic), in training and test alike; none keeps
        prompts whole.
      validation: t0: evaluate on a validation split of the training items instead of the
        test items (the test items are not used at all): for choosing settings without
        looking at the test set.
    """

    kind: Literal["t0", "commonsense", "gsm8k"] = "t0"
    names: tuple[str, ...] = AG_NEWS_TEMPLATES
    test_fraction: float = 0.25
    split_seed: int = 0
    max_train: int | None = None
    max_test: int | None = None
    max_passage_words: int | None = None
    validation: bool = False


@dataclasses.dataclass(frozen=True)
class GeneralSpec:
    """General capability, measured before and after fine-tuning; forgetting is its drop.

    Attributes:
      kind: "stories" (stories the base model writes from BOS: held-out NLL, agreement with the
        base model's next-token distribution; for small vocabularies) or "benchmarks" (accuracy
        on `benchmarks`).
      num_stories: stories sampled.
      story_tokens: the longest story, in tokens.
      story_seed: seed of the story sampling.
      story_temperature: sampling temperature of the stories.
      benchmarks: "mmlu" (hub cais/mmlu), "gsm8k", or commonsense sets such as "piqa".
      max_examples: cap per benchmark (seeded subsample); none for all.
    """

    kind: Literal["stories", "benchmarks"] = "stories"
    num_stories: int = 32
    story_tokens: int = 192
    story_seed: int = 1234
    story_temperature: float = 1.0
    benchmarks: tuple[str, ...] = ()
    max_examples: int | None = None


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """How accuracies are measured.

    Attributes:
      mode: "generate" (greedy decoding, answer extracted) or "likelihood" (best-scoring choice).
      max_new_tokens: tokens generated per downstream answer.
      benchmark_max_new_tokens: tokens generated per benchmark answer (GSM8K needs a solution).
      max_length: prompt + answer positions (longer prompts keep BOS and their end).
      batch_size: prompts per generation call / rows per scoring pass.
      length_normalized: likelihood mode: compare mean per-token log-probabilities.
      also_likelihood: in generate mode, also report accuracy by likelihood over the choices
        (`downstream_likelihood`): whether the model ranks the right answer first even where it
        does not write it out.
      curve_every: when > 0, also measure downstream accuracy and forgetting every this many
        training steps (and at the last), so each method draws a curve in tradeoff.png; 0: the
        final point only.
      curve_examples: the first this many evaluation examples score each curve point (a cheap
        subset; the final point still uses all); none: all of them.
    """

    mode: Literal["generate", "likelihood"] = "generate"
    max_new_tokens: int = 16
    benchmark_max_new_tokens: int = 256
    max_length: int = 256
    batch_size: int = 32
    length_normalized: bool = False
    also_likelihood: bool = True
    curve_every: int = 0
    curve_examples: int | None = 64


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Training batches.

    Attributes:
      batch_size: rows per global batch.
      seq_len: row length; longer examples keep BOS and the end of the prompt.
      epochs: when > 0, train this many passes over the training set (sets train.steps).
      pack: pack several examples per row.
    """

    batch_size: int = 8
    seq_len: int = 256
    epochs: float = 0.0
    pack: bool = False


@dataclasses.dataclass(frozen=True)
class TuneSpec:
    """The tuning protocol (experiments/slim_tune.py): the same budget of trials per method,
    scored on a validation split of the training items; the best setting per method is used for
    the final runs over every seed.

    Attributes:
      trials: settings tried per method before the final runs (trial 0: the preset's own); 0
        turns tuning off.
      seed: seed of the draws and the one seed every trial trains with.
      lr_range: learning rates drawn log-uniformly between these two.
      l1_coeffs: L1 coefficients drawn from (SLIM and its ablations).
      top_ks: top-k values drawn from (those the method's expert count allows).
      yield_quantiles: yielding quantiles drawn from (methods that yield).
      forgetting_weight: a trial's score is validation accuracy minus this times forgetting.
    """

    trials: int = 0
    seed: int = 0
    lr_range: tuple[float, float] = (2e-4, 5e-3)
    l1_coeffs: tuple[float, ...] = (0.0, 1e-4, 1e-3, 1e-2)
    top_ks: tuple[int, ...] = (1, 2, 3)
    yield_quantiles: tuple[float, ...] = (0.8, 0.9, 0.99)
    forgetting_weight: float = 0.0


@dataclasses.dataclass(frozen=True)
class SlimExperiment:
    """The SLIM experiment: methods x seeds on one task, downstream accuracy and forgetting.

    Attributes:
      preset: the preset these values started from (recorded; choose it with --preset).
      methods: methods to compare (see experiments/slim_methods.py).
      seeds: seeds; each method trains once per seed (adapter init, data order, masks).
      out: the run folder (created; results, plots, adapters, config and command go there);
        none: runs/slim_finetune/<preset>-<time>. The same folder again resumes its run.
      overwrite: delete and redo a finished run in `out` (otherwise refused).
      data_dir: the data folder; overrides $SLIM_JAX_DATA_DIR.
      targets: regex over linear-layer paths that get adapters.
      num_devices: devices to use (0: all).
      workers: runs in parallel, each in its own process (CPU: one process's small programs run
        mostly on one core, so two workers use two cores); 1 runs them in this process, as
        multi-host jobs must.
      compilation_cache: folder of JAX's persistent compilation cache (seeds after the first reuse
        the compiled programs); none turns it off.
      compile_only: compile each method's training step for `topology` and report memory per
        chip, FLOPs and the MFU bound, then exit (0: fits); no weights, no data
        (experiments/compile_only.py).
      topology: the topology to compile for (v4-32, v5e-16, v5e-256, v5p-64, v6e-16, cpu-8).
      model: the base model.
      task: the downstream task.
      general: the general-capability measure.
      eval: accuracy measurement.
      data: training batches.
      slim: the full SLIM method's adapter; the ablations change single fields of it.
      train: the training run (the same for every method; run_dir is set per run).
      tune: the tuning protocol run before the final runs (off unless `--tune.trials`).
    """

    preset: str = "cpu"
    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    out: str | None = None
    overwrite: bool = False
    data_dir: str | None = None
    targets: str = ALL_PROJECTIONS
    num_devices: int = 0
    workers: int = 1
    compilation_cache: str | None = "~/.cache/slim_jax/xla"
    compile_only: bool = False
    topology: str | None = None
    model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    task: TaskSpec = TaskSpec()
    general: GeneralSpec = GeneralSpec()
    eval: EvalSpec = EvalSpec()
    data: DataSpec = DataSpec()
    slim: SlimConfig = dataclasses.field(default_factory=SlimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    tune: TuneSpec = TuneSpec()


CPU = SlimExperiment(
    preset="cpu",
    workers=2,
    # Articles cut to their first 25 words (title and lead) fit 160-token rows: in pilot runs
    # LoRA learned as well as on 256-token rows (held-out accuracy 0.76 vs 0.77 after 200 steps)
    # at about half the cost per step.
    task=TaskSpec(max_passage_words=25),
    data=DataSpec(batch_size=8, seq_len=160),
    eval=EvalSpec(max_new_tokens=16, max_length=176),
    # A pilot run (one seed, p = 0.3) lost 18 points of accuracy to dynamic merging against
    # slim_no_dropmerge; p = 0.1 keeps merging on with a milder drop.
    # Yielding threshold: with the spec's t = 1, d(x) > 0 for nearly every token of these 64-
    # and 172-channel layers, and SLIM learned 14 points less than without yielding; a per-layer
    # running 0.9-quantile (SlimConfig.yield_quantile) learned as well as no yielding and forgot
    # least (validation split of the training items, seeds 0 and 1: 64.7% / 0.60 nats against
    # 51.6% / 0.84 with t = 1, 65.7% / 0.64 without yielding; q = 0.99: 64.9% / 0.63).
    slim=SlimConfig(num_lora_experts=4, num_identity_experts=2, top_k=2, rank=4, alpha=8,
                    num_clusters=4, dropmerge_p=0.1, yield_quantile=0.9),
    train=TrainConfig(
        steps=200, l1_coeff=1e-3, log_every=5, save_every=20, keep_checkpoints=1,
        async_checkpoint=False, progress=False, mesh=MeshConfig(data=-1),
        optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=20, final_lr_ratio=0.1),
    ),
)


def _pod(names: tuple[str, ...], preset: str) -> SlimExperiment:
    return SlimExperiment(
        preset=preset,
        out=f"runs/slim_{preset}",
        num_devices=0,
        # Layers scanned: one compiled layer body (benchmarks/POD.md); remat stays off, as the
        # documented v5p-64 does not need it (v5e-16 / v5e-256: --model.remat full).
        model=ModelSpec(path=POD_MODEL, dtype="bfloat16", param_dtype="bfloat16",
                        scan_layers=True),
        task=TaskSpec(kind="commonsense", names=names),
        general=GeneralSpec(kind="benchmarks", benchmarks=("mmlu", "gsm8k", "piqa")),
        eval=EvalSpec(mode="generate", max_new_tokens=32, benchmark_max_new_tokens=256,
                      max_length=1024, batch_size=64),
        data=DataSpec(batch_size=16, seq_len=1024, epochs=2.0),
        # Yielding: the cpu study's running 0.9-quantile threshold (see CPU above); at d = 4096
        # the spec's t = 1 lies below the max |z| of nearly every token.
        slim=SlimConfig(num_lora_experts=8, num_identity_experts=2, top_k=2, rank=16, alpha=32,
                        num_clusters=8, dropmerge_p=0.3, yield_quantile=0.9),
        train=TrainConfig(
            steps=1000, l1_coeff=1e-3, log_every=10, save_every=100, keep_checkpoints=1,
            frozen_dtype="bfloat16", progress=True,
            # v5p-64: 16 fsdp x 2 tensor, one row per pair (fsdp over all 32 chips would need
            # a batch of 32); compiled to fit in benchmarks/POD.md.
            mesh=MeshConfig(data=1, fsdp=-1, tensor=2),
            optimizer=OptimizerConfig(learning_rate=2e-4, warmup_steps=100),
        ),
    )


PRESETS: dict[str, SlimExperiment] = {
    "cpu": CPU,
    "pod_multi": _pod(("openbookqa", "social_i_qa", "boolq"), "pod_multi"),
    "pod_csqa": _pod(("commonsense_qa",), "pod_csqa"),
    "pod_hellaswag": _pod(("hellaswag",), "pod_hellaswag"),
    "pod_winogrande": _pod(("winogrande",), "pod_winogrande"),
    "pod_arc_e": _pod(("ARC-Easy",), "pod_arc_e"),
    "pod_arc_c": _pod(("ARC-Challenge",), "pod_arc_c"),
}


def preset(name: str) -> SlimExperiment:
    """The preset called `name`.

    Raises:
      ConfigError: an unknown name (listing the presets).

    >>> preset("cpu").model.path
    'tinystories260k/checkpoint_v1.bin'
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]
