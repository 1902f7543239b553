"""`python -m experiments.slim_finetune`: does SLIM learn more and forget less than its baselines?

For every method (SLIM, its ablations, LoRA of matched size; `experiments/slim_methods.py`) and
seed, the base model gets the method's adapters on the target layers and trains with the shared
trainer (`slim_jax.train.Trainer`: same steps, batch and learning rate for all); then downstream
accuracy and general capability are measured (`slim_jax.eval`), and forgetting is the drop of
the general measure from the base model. The run folder (`--out`; by default a new
`runs/slim_finetune/<preset>-<time>`):

    <out>/command.txt, config.json      the exact command, the full resolved config
    <out>/results.json, results.md      every run's record; the table (mean ± std over seeds)
    <out>/loss_curves.png               training loss per method
    <out>/tradeoff.png                  downstream accuracy against forgetting per method
    <out>/stories.json                  (stories measure) the base model's stories, token ids
    <out>/base/predictions.jsonl        the base model's answers to the test set
    <out>/runs/<method>/seed<k>/        result.json, predictions.jsonl, the trainer's
                                        metrics.jsonl and loss.png, checkpoints/ (orbax:
                                        adapters, SLIM cluster state, optimiser), and for
                                        `lora` peft/ (the adapter in PEFT's format; PEFT has no
                                        mixture-of-experts format, so SLIM adapters stay orbax)

Examples:
    python -m experiments.slim_finetune                       # the cpu preset, everything
    python -m experiments.slim_finetune --methods slim,lora --seeds 0 --train.steps 30
    python -m experiments.slim_finetune --preset pod_multi --model.path /ckpt/openchat-8b
    python -m experiments.slim_finetune --help                # every field and its default
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import shlex
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from experiments.config_cli import parse_preset_cli
from experiments.presets.slim import PRESETS, SlimExperiment, TaskSpec, preset
from experiments.run_folder import default_run_folder
from experiments.slim_methods import Method, check_methods, make_method, target_shapes
from experiments.slim_report import markdown_table, plot_losses, plot_tradeoff, summarize
from slim_jax.data import BatchIterator, CausalLayout, tokenize_examples
from slim_jax.errors import CheckpointError, ConfigError, DataError, SlimJaxError
from slim_jax.eval import (
    BenchmarkCapability,
    DownstreamResult,
    DownstreamTask,
    GeneralCapability,
    StoryCapability,
    commonsense_task,
    downstream_accuracy,
    eval_view,
    forgetting_by_measure,
    gsm8k_task,
    mmlu_task,
    t0_classification_task,
)
from slim_jax.models.llama import Llama
from slim_jax.models.llama2c import load_llama2c
from slim_jax.models.peft_io import save_peft
from slim_jax.nn import inject
from slim_jax.parallel import initialize_distributed, make_mesh, shard_module
from slim_jax.settings import DATA_DIR_ENV, enable_compilation_cache, locate
from slim_jax.settings import data_dir as resolve_data_dir
from slim_jax.tokenizer import HFTokenizer, Tokenizer
from slim_jax.train import Trainer, TrainResult
from slim_jax.train.metrics import count_params

PROG = "python -m experiments.slim_finetune"
CLI_EXCLUDED = (("preset",), ("train", "run_dir"))
LLAMA2C_FILES = ("checkpoint_v1.bin", "tokenizer.bin")


# -- command line -------------------------------------------------------------------------------

def parse_cli(argv: Sequence[str] | None = None) -> SlimExperiment:
    """The experiment config from the command line: `--preset` first, then field overrides.

    Raises:
      ConfigError: an unknown preset, or an override the config's validation rejects.
    """
    return parse_preset_cli(PROG, __doc__, PRESETS, preset, argv,
                            exclude=CLI_EXCLUDED)


# -- inputs -------------------------------------------------------------------------------------

def resolve_inputs(config: SlimExperiment) -> Path | None:
    """Check, before any work, that the data folder and the model exist; return the folder.

    The data folder is needed by the llama2c model, the T0 / GSM8K tasks, local commonsense sets
    and local benchmarks; an HF model with hub data runs without one.

    Raises:
      DataError: no data folder, or one without the files the config reads (named).
      CheckpointError: a model folder that does not exist or lacks its files.
    """
    try:
        folder = resolve_data_dir(config.data_dir)
    except DataError:
        if config.model.kind == "llama2c" or config.task.kind in ("t0", "gsm8k"):
            raise
        folder = None
    if folder is not None:
        needed = []
        if config.task.kind == "t0":
            needed += [f"t0_templates/{n}.jsonl" for n in config.task.names]
        if config.task.kind == "gsm8k" or "gsm8k" in _benchmarks(config):
            needed += ["gsm8k/train.jsonl", "gsm8k/test.jsonl"]
        missing = [n for n in needed if not (folder / n).is_file()]
        if missing:
            raise DataError(f"data folder {folder} lacks {', '.join(missing[:5])}"
                            + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
                            + f": point --data-dir or ${DATA_DIR_ENV} at a folder laid out like "
                              "shared/data")
    if config.model.kind == "llama2c":
        model_dir = _llama2c_dir(config, folder)
        missing = [f for f in LLAMA2C_FILES if not (model_dir / f).is_file()]
        if missing:
            raise CheckpointError(f"model folder {model_dir} lacks {', '.join(missing)}: give "
                                  "--model.path a llama2.c folder (checkpoint_v1.bin + "
                                  "tokenizer.bin), absolute or relative to the data folder")
    elif config.model.kind == "hf":
        path = Path(config.model.path).expanduser()
        looks_local = config.model.path.startswith(("/", ".", "~")) or path.exists()
        if looks_local and not (path / "config.json").is_file():
            raise CheckpointError(f"model folder {path} does not exist or has no config.json: "
                                  "give --model.path a Hugging Face model folder or hub id")
    else:
        raise ConfigError(f"model.kind must be 'llama2c' or 'hf', got {config.model.kind!r}")
    return folder


def _benchmarks(config: SlimExperiment) -> tuple[str, ...]:
    return config.general.benchmarks if config.general.kind == "benchmarks" else ()


def _llama2c_dir(config: SlimExperiment, folder: Path | None) -> Path:
    return Path(locate(config.model.path, folder))


def load_model(config: SlimExperiment, folder: Path | None) -> tuple[nnx.Module, Tokenizer]:
    """A fresh copy of the base model and its tokenizer."""
    spec = config.model
    if spec.kind == "llama2c":
        model_dir = _llama2c_dir(config, folder)
        return load_llama2c(model_dir / LLAMA2C_FILES[0], model_dir / LLAMA2C_FILES[1],
                            dtype=spec.dtype, param_dtype=spec.param_dtype)
    model = Llama.from_pretrained(spec.path, dtype=spec.dtype, param_dtype=spec.param_dtype)
    return model, HFTokenizer(spec.path)


def check_validation(spec: TaskSpec) -> None:
    """Raise ConfigError if `task.validation` is set for a task kind without item splits."""
    if spec.validation and spec.kind != "t0":
        raise ConfigError(f"task.validation is for t0 tasks (split by item); task.kind "
                          f"{spec.kind!r} has its own test set: drop --task.validation")


def build_task(config: SlimExperiment, folder: Path | None) -> DownstreamTask:
    """The downstream task of `config.task`."""
    spec = config.task
    caps = {"max_train": spec.max_train, "max_test": spec.max_test, "seed": spec.split_seed}
    if spec.kind == "t0":
        return t0_classification_task(spec.names, folder, test_fraction=spec.test_fraction,
                                      max_passage_words=spec.max_passage_words,
                                      validation=spec.validation, **caps)
    check_validation(spec)
    if spec.kind == "commonsense":
        return commonsense_task(spec.names, folder, **caps)
    if spec.kind == "gsm8k":
        return gsm8k_task(folder, **caps)
    raise ConfigError(f"task.kind must be 't0', 'commonsense' or 'gsm8k', got {spec.kind!r}")


def build_capability(config: SlimExperiment, base: nnx.Module, tokenizer: Tokenizer,
                     folder: Path | None) -> GeneralCapability:
    """The general-capability measure of `config.general`, built on the base model."""
    spec, ev = config.general, config.eval
    if spec.kind == "stories":
        return StoryCapability.sample(base, tokenizer, num_stories=spec.num_stories,
                                      max_new_tokens=spec.story_tokens, seed=spec.story_seed,
                                      temperature=spec.story_temperature)
    if spec.kind != "benchmarks":
        raise ConfigError(f"general.kind must be 'stories' or 'benchmarks', got {spec.kind!r}")
    if not spec.benchmarks:
        raise ConfigError("general.kind 'benchmarks' needs general.benchmarks, e.g. "
                          "--general.benchmarks mmlu,gsm8k,piqa")
    tasks = []
    for name in spec.benchmarks:
        if name == "mmlu":
            tasks.append(mmlu_task(max_test=spec.max_examples, seed=config.task.split_seed))
        elif name == "gsm8k":
            tasks.append(gsm8k_task(folder, max_train=1, max_test=spec.max_examples))
        else:
            tasks.append(commonsense_task([name], folder, max_test=spec.max_examples,
                                          with_train=False))
    return BenchmarkCapability(tokenizer, tasks, mode=ev.mode, max_new_tokens=ev.max_new_tokens,
                               number_max_new_tokens=ev.benchmark_max_new_tokens,
                               max_length=ev.max_length, batch_size=ev.batch_size)


# -- one run ------------------------------------------------------------------------------------

class Preempted(Exception):
    """SIGTERM stopped a run: its checkpoint is saved; the experiment stops after writing the
    results of the runs that finished."""


@dataclasses.dataclass
class Context:
    """What every run shares: config, folders, task, tokenised training data, the base measures."""

    config: SlimExperiment
    folder: Path | None
    out: Path
    tokenizer: Tokenizer
    task: DownstreamTask
    layout: CausalLayout
    train_data: list[Any]
    capability: GeneralCapability
    base: dict[str, Any]
    devices: list[jax.Device]

    @property
    def leader(self) -> bool:
        """Process 0 writes the run folder's files (checkpoints are written by all)."""
        return jax.process_index() == 0


def evaluate_downstream(config: SlimExperiment, tokenizer: Tokenizer, task: DownstreamTask,
                        model: nnx.Module) -> tuple[DownstreamResult, float | None]:
    """Downstream accuracy of `model` (in inference mode) as `config.eval` says, and the
    accuracy by likelihood when it is asked for as well (None otherwise)."""
    ev = config.eval
    result = downstream_accuracy(model, tokenizer, task, mode=ev.mode,
                                 max_new_tokens=ev.max_new_tokens, max_length=ev.max_length,
                                 batch_size=ev.batch_size, length_normalized=ev.length_normalized)
    if not (ev.also_likelihood and ev.mode == "generate" and task.kind != "number"):
        return result, None
    ranked = downstream_accuracy(model, tokenizer, task, mode="likelihood",
                                 max_length=ev.max_length, batch_size=ev.batch_size,
                                 length_normalized=ev.length_normalized)
    return result, ranked.accuracy


def write_predictions(path: Path, task: DownstreamTask, result: DownstreamResult) -> None:
    """One JSON line per test example: reference, prediction, correct, output."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i, example in enumerate(task.test):
            f.write(json.dumps({"answer": example.answer, "predicted": result.predictions[i],
                                "correct": result.correct[i],
                                "output": result.outputs[i]}) + "\n")


def steps_for(config: SlimExperiment, num_examples: int) -> int:
    """Training steps: `data.epochs` passes when set, else `train.steps`."""
    if config.data.epochs > 0:
        return max(1, round(config.data.epochs * num_examples / config.data.batch_size))
    return config.train.steps


def run_method(ctx: Context, method_name: str, seed: int) -> dict[str, Any]:
    """Train one method with one seed, evaluate it, save its adapters; returns its record."""
    config = ctx.config
    run_dir = ctx.out / "runs" / method_name / f"seed{seed}"
    if run_dir.exists():
        raise ConfigError(f"run folder {run_dir} already exists; choose a new --out")
    model, _ = load_model(config, ctx.folder)
    method: Method = make_method(method_name, config.slim, target_shapes(model, config.targets))
    inject(model, config.targets, method.adapter, rngs=nnx.Rngs(seed))
    steps = steps_for(config, len(ctx.train_data))
    train_config = dataclasses.replace(
        config.train, steps=steps, run_dir=str(run_dir),
        l1_coeff=config.train.l1_coeff if method.l1 else 0.0)
    batches = BatchIterator(ctx.train_data, ctx.layout, global_batch_size=config.data.batch_size,
                            seed=seed, pack=config.data.pack, process_index=jax.process_index(),
                            process_count=jax.process_count())
    start = time.perf_counter()
    trainer = Trainer(model, train_config, devices=ctx.devices)
    result: TrainResult = trainer.fit(batches)
    train_seconds = time.perf_counter() - start
    if result.stopped == "preempted":
        raise Preempted(f"{method_name} seed {seed} stopped by SIGTERM at step {result.step} "
                        f"(checkpoint in {run_dir / 'checkpoints'})")

    start = time.perf_counter()
    trained = eval_view(trainer.model())
    downstream, by_likelihood = evaluate_downstream(config, ctx.tokenizer, ctx.task, trained)
    general = ctx.capability.measure(trained)
    eval_seconds = time.perf_counter() - start
    if ctx.leader:
        write_predictions(run_dir / "predictions.jsonl", ctx.task, downstream)
        if method_name == "lora":
            save_peft(trainer.model(), run_dir / "peft", base_model_name_or_path=config.model.path)

    headline = ctx.capability.headline
    drops = forgetting_by_measure(ctx.capability, ctx.base["general"], general)
    ces = [h["ce"] for h in result.history]
    tail = ces[-max(1, len(ces) // 10):]
    record = {
        "method": method_name, "seed": seed, "steps": result.step, "stopped": result.stopped,
        "adapter": {"type": type(method.adapter).__name__,
                    **dataclasses.asdict(method.adapter)},
        "l1_coeff": train_config.l1_coeff,
        "trainable_params": count_params(trainer.state.params),
        "final_ce": sum(tail) / len(tail),
        "downstream": downstream.accuracy, "downstream_likelihood": by_likelihood,
        "general": general, "general_score": general[headline],
        "forgetting": drops[headline], "forgetting_by_measure": drops,
        "train_seconds": train_seconds, "eval_seconds": eval_seconds,
        "checkpoint": str(run_dir / "checkpoints"),
    }
    if ctx.leader:
        _write_json(run_dir / "result.json", record)
    print(f"[{method_name} seed {seed}] {result.step} steps in {train_seconds:.1f}s (final "
          f"cross-entropy {record['final_ce']:.3f}); downstream {100 * downstream.accuracy:.1f}%"
          + ("" if by_likelihood is None else f" (by likelihood {100 * by_likelihood:.1f}%)")
          + ", "
          f"{headline} {general[headline]:.4f} (forgetting {drops[headline]:+.4f}); "
          f"eval {eval_seconds:.1f}s", flush=True)
    return record


# -- the experiment ----------------------------------------------------------------------------

def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, default=str) + "\n")


def prepare(config: SlimExperiment, folder: Path | None, out: Path, *,
            stories: list[list[int]] | None = None,
            base_record: dict[str, Any] | None = None) -> Context:
    """Everything the runs share. Without `base_record` the base model is evaluated here (and its
    stories sampled); a worker process passes the parent's stories and base record instead, so
    every process measures against the very same reference."""
    devices = jax.devices()[:config.num_devices] if config.num_devices else jax.devices()
    base_model, tokenizer = load_model(config, folder)
    shard_module(base_model, make_mesh(config.train.mesh, devices), config.train.rules)
    base = eval_view(base_model)
    task = build_task(config, folder)
    layout = CausalLayout(tokenizer, lengths=(config.data.seq_len,))
    train_data = tokenize_examples(task.train, layout, task.template)
    if stories is not None:
        capability: GeneralCapability = StoryCapability(base, tokenizer, stories)
    else:
        capability = build_capability(config, base, tokenizer, folder)
    ctx = Context(config, folder, out, tokenizer, task, layout, train_data, capability,
                  base_record or {}, devices)
    if base_record is None:
        downstream, by_likelihood = evaluate_downstream(config, tokenizer, task, base)
        general = capability.measure(base)
        ctx.base = {"downstream": downstream.accuracy, "downstream_likelihood": by_likelihood,
                    "general": general,
                    "general_score": general[capability.headline],
                    "majority": task.majority_accuracy()}
        if ctx.leader:
            write_predictions(out / "base" / "predictions.jsonl", task, downstream)
    return ctx


def schedule(methods: Sequence[str], seeds: Sequence[int], workers: int) -> list[tuple[str, int]]:
    """The order of the (method, seed) runs: `workers` methods side by side, seed after seed,
    so that runs in flight at once are different methods and every later seed of a method finds
    its programs in the compilation cache.

    >>> schedule(["a", "b", "c"], [0, 1], workers=2)
    [('a', 0), ('b', 0), ('a', 1), ('b', 1), ('c', 0), ('c', 1)]
    """
    jobs = []
    for start in range(0, len(methods), workers):
        group = methods[start:start + workers]
        jobs.extend((method, seed) for seed in seeds for method in group)
    return jobs


_WORKER: Context | None = None


def _worker_init(config: SlimExperiment, folder: Path | None, out: Path,
                 stories: list[list[int]] | None, base_record: dict[str, Any]) -> None:
    global _WORKER
    enable_compilation_cache(config.compilation_cache)
    _WORKER = prepare(config, folder, out, stories=stories, base_record=base_record)


def _worker_run(method: str, seed: int) -> dict[str, Any]:
    assert _WORKER is not None, "worker used before its initialiser ran"
    return run_method(_WORKER, method, seed)


def run_experiment(config: SlimExperiment, command: str) -> dict[str, Any]:
    """Run every method and seed of `config`; write the run folder; return `results.json`'s
    content (with `stopped`: "completed" or "preempted").

    With `config.workers > 1` the runs are spread over that many worker processes (a CPU runs
    one process's small programs mostly on one core; two processes use two).

    Raises:
      SlimJaxError: bad input (unknown method, missing data or model, invalid config), before
        any training starts.
    """
    check_methods(config.methods)
    if not config.seeds:
        raise ConfigError("no seed given: pass --seeds, e.g. --seeds 0,1,2")
    check_validation(config.task)
    if config.workers < 1 or (config.workers > 1 and jax.process_count() > 1):
        raise ConfigError(f"workers must be >= 1, and 1 in a multi-process job; got "
                          f"{config.workers}")
    folder = resolve_inputs(config)
    out = (Path(config.out).expanduser() if config.out is not None
           else default_run_folder("slim_finetune", config.preset)).resolve()
    config = dataclasses.replace(config, out=str(out))  # config.json records where it went
    if (out / "results.json").exists() or (out / "runs").exists():
        raise ConfigError(f"{out} already holds results; choose a new --out")
    enable_compilation_cache(config.compilation_cache)
    clock = time.perf_counter()
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "command.txt").write_text(command + "\n")
        _write_json(out / "config.json", dataclasses.asdict(config))

    ctx = prepare(config, folder, out)
    stories = ctx.capability.stories if isinstance(ctx.capability, StoryCapability) else None
    if ctx.leader and stories is not None:
        _write_json(out / "stories.json", {"stories": stories,
                                           "texts": [ctx.tokenizer.decode(s) for s in stories]})
    print(f"task {ctx.task.name}: {len(ctx.task.train)} training / {len(ctx.task.test)} test "
          f"examples (majority answer {100 * ctx.base['majority']:.1f}%); base model: "
          f"downstream {100 * ctx.base['downstream']:.1f}%, {ctx.capability.headline} "
          f"{ctx.base['general_score']:.4f}; methods {', '.join(config.methods)}; seeds "
          f"{', '.join(map(str, config.seeds))}", flush=True)

    runs: list[dict[str, Any]] = []
    results: dict[str, Any] = {"runs": runs}
    jobs = schedule(config.methods, config.seeds, config.workers)
    try:
        if config.workers == 1:
            for method, seed in jobs:
                runs.append(run_method(ctx, method, seed))
                if ctx.leader:
                    results = _write_results(ctx, runs, time.perf_counter() - clock)
        else:
            with ProcessPoolExecutor(
                    config.workers, mp_context=multiprocessing.get_context("spawn"),
                    initializer=_worker_init,
                    initargs=(config, folder, out, stories, ctx.base)) as pool:
                futures = [pool.submit(_worker_run, method, seed) for method, seed in jobs]
                for future in as_completed(futures):
                    runs.append(future.result())
                    results = _write_results(ctx, _ordered(runs, config.methods),
                                             time.perf_counter() - clock)
    except Preempted as stop:
        print(f"{stop}; results of the {len(runs)} finished runs are in {out}", flush=True)
        return {**results, "stopped": "preempted"}
    print(f"done in {time.perf_counter() - clock:.0f}s; results in {out / 'results.md'}",
          flush=True)
    return {**results, "stopped": "completed"}


def _ordered(runs: list[dict[str, Any]], methods: Sequence[str]) -> list[dict[str, Any]]:
    """Runs by method (in `methods` order), then seed: workers finish in any order."""
    return sorted(runs, key=lambda r: (list(methods).index(r["method"]), r["seed"]))


def _write_results(ctx: Context, runs: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """Write results.json, results.md and the plots from the runs so far."""
    config, cap = ctx.config, ctx.capability
    higher = cap.higher_is_better(cap.headline)
    summary = summarize(runs, config.methods)
    results = {
        "preset": config.preset, "task": ctx.task.name, "num_train": len(ctx.task.train),
        "num_test": len(ctx.task.test), "general_headline": cap.headline,
        "general_higher_is_better": higher, "base": ctx.base, "summary": summary, "runs": runs,
        "wall_seconds": seconds, "devices": [str(d) for d in ctx.devices],
    }
    _write_json(ctx.out / "results.json", results)
    table = markdown_table(summary, ctx.base, headline=cap.headline, higher_is_better=higher)
    (ctx.out / "results.md").write_text(
        f"# SLIM experiment: preset `{config.preset}`, task `{ctx.task.name}`\n\n"
        f"Command: `{(ctx.out / 'command.txt').read_text().strip()}`\n\n"
        f"{len(ctx.task.train)} training / {len(ctx.task.test)} test examples; majority answer "
        f"{100 * ctx.base['majority']:.1f}%. Mean ± std over seeds; wall time {seconds:.0f}s.\n\n"
        + table)
    by_method: dict[str, list[str]] = {}
    for r in runs:
        by_method.setdefault(r["method"], []).append(str(Path(r["checkpoint"]).parent))
    plot_losses(by_method, ctx.out / "loss_curves.png")
    plot_tradeoff(summary, ctx.base, ctx.out / "tradeoff.png", headline=cap.headline)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """The command line. Returns 0 when done, 2 on bad input (one line on stderr, no
    traceback), 143 when SIGTERM stopped it (checkpoint and finished results saved)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        config = parse_cli(args)
        if config.compile_only:  # compile for --topology and report; no weights, no data
            from experiments.compile_only import slim_compile_only

            return slim_compile_only(config)
        initialize_distributed()  # joins the job when a launcher started several processes
        results = run_experiment(config, shlex.join([*PROG.split(), *args]))
    except SlimJaxError as err:
        message = " ".join(str(err).split())
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    return 143 if results["stopped"] == "preempted" else 0


if __name__ == "__main__":
    sys.exit(main())
