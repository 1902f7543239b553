"""Configuration of `python -m experiments.lorahub_bbh` and of
`python -m experiments.train_lora_modules`, and their named presets.

Each config is a tree of frozen dataclasses, every field a flag (`experiments.cli`); the
LoRAHub protocol itself is the library's `slim_jax.lorahub.ProtocolConfig` (`--protocol.budget
80`; `--protocol.search NAME` selects LoRAHub's search from `slim_jax.lorahub.SEARCHES`,
`--protocol.population-size P` its population, `--protocol.compare cobyla,gradient` the searches
run beside it).

Presets:
- `cpu` (the default): the real pretrained TinyStories model (llama2.c `stories260K`, 260K
  parameters, 512 positions) with 24 LoRA modules trained locally by `train_lora_modules` on the
  first 24 T0 template tasks of LoRAHub's module list that exist in the data folder (r=16,
  alpha=32 as LoRAHub's, on `q_proj` and `v_proj`: the Llama names of T5's `q` and `v`; 150
  steps each, 20 examples of each task held out to score the module on its own task); each run
  draws 20 of them (`random.seed(s); random.sample(names, 20)` over the 24 in list order), so the
  draws differ as in the paper. The targets: four BBH tasks with one-word answers (Yes/No,
  True/False) and prompts that fit the model's 512 positions, all of their test examples, and
  `CPU_T0_TARGETS`, T0 classification templates left out of the module library (scored on
  their test split; chosen by a pilot on their validation items, experiments/RESULTS.md). The
  paper's protocol (K=5, five draws, budget 40) except that greedy decoding stops after 32 new
  tokens instead of 256: the answers are one or two words, and a 32-token continuation that has
  not ended is already wrong under exact match unless the rest is dots and spaces.
- `flan-t5-large`: the paper's setting: google/flan-t5-large with the published
  `lorahub/flan_t5_large-*` modules (a local folder or the hub), all 27 tasks; sized for a
  v5e-16 (`--compile-only true --topology v5e-16`): population scoring spread over the chips,
  greedy generation 16 prompts at a time on one chip.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from experiments.presets.common import ModelSpec
from slim_jax.errors import ConfigError
from slim_jax.lorahub.protocol import ProtocolConfig
from slim_jax.lorahub.upstream import UpstreamConfig
from slim_jax.nn import LoRAConfig
from slim_jax.parallel import MeshConfig
from slim_jax.train import OptimizerConfig, TrainConfig

CPU_TASKS: tuple[str, ...] = (
    "boolean_expressions", "navigate", "sports_understanding", "web_of_lies")
# T0 templates left out of the module library, chosen by the pilot on their validation items
# (experiments/RESULTS.md, "LoRAHub on unseen tasks"): a method scores above 0 on each (the
# library can produce its answers), one template per dataset.
CPU_T0_TARGETS: tuple[str, ...] = (
    "amazon_polarity_Is_this_product_review_positive", "glue_qqp_answer",
    "paws_labeled_final_Meaning", "social_i_qa_Check_if_a_random_answer_is_valid_or_not")
ALL = ("all",)


@dataclasses.dataclass(frozen=True)
class UpstreamSpec:
    """Training of the upstream LoRA modules (`train_lora_modules`).

    Attributes:
      num_modules: train the first this many tasks of LoRAHub's module list that have T0
        template data (in the list's order); none for all of them.
      tasks: train these tasks instead (T0 template names); empty: use num_modules.
      rank: LoRA rank (LoRAHub: 16).
      alpha: LoRA alpha (LoRAHub: 32).
      dropout: LoRA dropout while training (LoRAHub: 0.1).
      targets: regex over layer paths of the adapted linears.
      steps: optimiser updates per module.
      batch_size: rows per batch.
      max_length: row length (decoder-only) / encoder and decoder length (T5), in tokens.
      pack: pack several examples per row (decoder-only).
      learning_rate: peak learning rate (LoRAHub: 2e-4).
      warmup_steps: linear warm-up.
      max_examples: examples per task at most (LoRAHub: 10k); none for all.
      seed: the first module's seed (module i uses seed + i).
      num_devices: devices the trainer uses (0: all); the batch must divide over them.
      save_every: checkpoint the module in training every this many steps (a stop signal saves
        it too), so an interrupted module continues where it was.
      heldout: examples of each task kept out of training (none from tasks of fewer than 5x
        as many, which train on all); the
        module's greedy exact match on them (its own task's held-out accuracy) goes to
        modules.json and modules.md (0: none).
    """

    num_modules: int | None = 24
    tasks: tuple[str, ...] = ()
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: str = r"(q|v)_proj$"
    steps: int = 150
    batch_size: int = 4
    max_length: int = 256
    pack: bool = True
    learning_rate: float = 3e-3
    warmup_steps: int = 3
    max_examples: int | None = None
    seed: int = 0
    num_devices: int = 0
    save_every: int = 25
    heldout: int = 20

    def __post_init__(self) -> None:
        if self.num_modules is not None and self.num_modules < 1:
            raise ConfigError(f"must be >= 1 or none, got {self.num_modules}",
                              field="num_modules")
        if self.max_length < 2:
            raise ConfigError(f"must be >= 2, got {self.max_length}", field="max_length")
        if self.num_devices < 0:
            raise ConfigError(f"must be >= 0 (0: all), got {self.num_devices}",
                              field="num_devices")
        self.library_config(encoder_decoder=False)  # its checks, named by these fields

    def library_config(self, encoder_decoder: bool) -> UpstreamConfig:
        """The library's `UpstreamConfig` of these settings. Every field it checks has the
        same name here, so its `ConfigError`s name this spec's fields."""
        train = TrainConfig(
            steps=self.steps, progress=False, save_every=self.save_every,
            log_every=1, keep_checkpoints=1, async_checkpoint=False,
            mesh=MeshConfig(data=-1),
            optimizer=OptimizerConfig(learning_rate=self.learning_rate,
                                      warmup_steps=self.warmup_steps))
        return UpstreamConfig(
            lora=LoRAConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout),
            targets=self.targets, train=train, batch_size=self.batch_size,
            pack=self.pack and not encoder_decoder, max_examples=self.max_examples,
            heldout=self.heldout)


@dataclasses.dataclass(frozen=True)
class ModulesSpec:
    """Where the LoRA modules come from.

    Attributes:
      dir: folder of PEFT adapter folders, one per module (named by task, by the id's last part
        or by the full id); none: only the hub.
      ids_file: the module ids in draw order; none: the data folder's lorahub_module_names.txt.
      local_only: draw from the modules present in `dir` (in the ids' order), as the cpu preset
        does with the modules it trained; otherwise from every id (missing ones from the hub).
      train_missing: when `dir` holds no module, train them first (`upstream` settings).
      allow_pickle: accept adapter_model.bin weights (a pickle can run code; published LoRAHub
        modules on the hub are stored that way).
    """

    dir: str | None = "runs/lorahub_modules/tinystories260k"
    ids_file: str | None = None
    local_only: bool = True
    train_missing: bool = True
    allow_pickle: bool = False


@dataclasses.dataclass(frozen=True)
class BBHSpec:
    """The BIG-Bench Hard tasks.

    Attributes:
      tasks: task names, or "all" for the 27.
      source: "local" (the data folder's bbh/) or "hub" (lukaemon/bbh).
    """

    tasks: tuple[str, ...] = CPU_TASKS
    source: Literal["local", "hub"] = "local"


@dataclasses.dataclass(frozen=True)
class T0TargetsSpec:
    """T0 classification templates left out of the module library, run as unseen targets
    through the same protocol as BBH (`slim_jax.data.T0Target`: K ADAPT examples from the
    template's train part, scored on its test part).

    Attributes:
      tasks: template names (each must not be one of the module library's tasks).
      validation: score on the train part's items outside the ADAPT set instead of the test
        items: for pilots that choose settings without reading the test split.
    """

    tasks: tuple[str, ...] = ()
    validation: bool = False


@dataclasses.dataclass(frozen=True)
class LoRAHubExperiment:
    """LoRAHub on BIG-Bench Hard: baselines and searches per task, five module draws.

    Attributes:
      preset: the preset these values started from (recorded; choose it with --preset).
      out: the run folder (created: results.md, results.json, search_progress.png, config,
        command); none: runs/lorahub_bbh/<preset>-<time>. The same folder again resumes.
      overwrite: delete and redo a finished run in `out` (otherwise refused).
      data_dir: the data folder; overrides $SLIM_JAX_DATA_DIR.
      progress: show progress bars.
      compilation_cache: folder of JAX's persistent compilation cache; none turns it off.
      compile_only: compile population scoring (P = 16, 64) and greedy generation for
        `topology` and report memory per chip and FLOPs, then exit (0: fits); no weights
        (experiments/compile_only.py).
      topology: the topology to compile for (v4-32, v5e-16, v5e-256, v5p-64, v6e-16, cpu-8).
      model: the base model.
      modules: the LoRA modules.
      upstream: training of missing modules.
      bbh: the BIG-Bench Hard tasks (empty for none).
      t0: T0 templates run as unseen targets beside them.
      protocol: LoRAHub's protocol (K, runs, draws, searches, budget, decoding).
    """

    preset: str = "cpu"
    out: str | None = None
    overwrite: bool = False
    data_dir: str | None = None
    progress: bool = True
    compilation_cache: str | None = "~/.cache/slim_jax/xla"
    compile_only: bool = False
    topology: str | None = None
    model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    modules: ModulesSpec = ModulesSpec()
    upstream: UpstreamSpec = UpstreamSpec()
    bbh: BBHSpec = BBHSpec()
    t0: T0TargetsSpec = T0TargetsSpec()
    protocol: ProtocolConfig = dataclasses.field(default_factory=ProtocolConfig)


@dataclasses.dataclass(frozen=True)
class UpstreamExperiment:
    """Upstream LoRA modules, one per T0 template task, saved as PEFT adapters.

    Attributes:
      preset: the preset these values started from (recorded; choose it with --preset).
      out: the module folder; each module goes to <out>/<task>; the same folder again resumes
        an interrupted set.
      data_dir: the data folder; overrides $SLIM_JAX_DATA_DIR.
      overwrite: delete and retrain a finished set in `out` (otherwise refused).
      progress: show a progress bar.
      compilation_cache: folder of JAX's persistent compilation cache (every module compiles
        the same step: the cache makes that once); none turns it off.
      model: the base model.
      upstream: what is trained, and how.
    """

    preset: str = "cpu"
    out: str = "runs/lorahub_modules/tinystories260k"
    data_dir: str | None = None
    overwrite: bool = False
    progress: bool = True
    compilation_cache: str | None = "~/.cache/slim_jax/xla"
    model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    upstream: UpstreamSpec = UpstreamSpec()


FLAN_T5_LARGE = "google/flan-t5-large"
_T5_MODEL = ModelSpec(path=FLAN_T5_LARGE)
# LoRAHub's upstream training: lr 2e-4, batch 10, 20 epochs of at most 10k examples, inputs up
# to 1024 tokens, r=16, alpha=32, dropout 0.1, on q and v (the T0 files hold ~200 examples).
_T5_UPSTREAM = UpstreamSpec(num_modules=None, targets=r"(q|v)$", steps=400, batch_size=10,
                            max_length=1024, pack=False, learning_rate=2e-4, warmup_steps=0,
                            dropout=0.1, max_examples=10_000, heldout=0)

PRESETS: dict[str, tuple[LoRAHubExperiment, UpstreamExperiment]] = {
    "cpu": (LoRAHubExperiment(t0=T0TargetsSpec(tasks=CPU_T0_TARGETS),
                              protocol=ProtocolConfig(max_new_tokens=32,
                                                      generation_batch_size=64)),
            UpstreamExperiment()),
    "flan-t5-large": (
        LoRAHubExperiment(
            preset="flan-t5-large", model=_T5_MODEL, upstream=_T5_UPSTREAM,
            # The published modules hold adapter_model.bin (PEFT 0.3): read with
            # torch.load(weights_only=True), which unpickles tensors only.
            modules=ModulesSpec(dir="lorahub_modules", local_only=False, train_missing=False,
                                allow_pickle=True),
            bbh=BBHSpec(tasks=ALL),
            # Greedy generation runs on one chip; 16 prompts of 2048 tokens (256 new) fit a
            # 16 GiB v5e chip, 32 do not (compiled: benchmarks/POD.md). Rows decode independently
            # (padding masked): the batch sets speed and memory, not the answers.
            protocol=ProtocolConfig(generation_batch_size=16)),
        UpstreamExperiment(preset="flan-t5-large", out="runs/lorahub_modules/flan-t5-large",
                           model=_T5_MODEL, upstream=_T5_UPSTREAM),
    ),
}


def preset(name: str) -> tuple[LoRAHubExperiment, UpstreamExperiment]:
    """The named preset's `(bbh experiment, upstream training)` configs."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
