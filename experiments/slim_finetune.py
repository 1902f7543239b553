"""`python -m experiments.slim_finetune`: does SLIM learn more and forget less than its baselines?

For every method (SLIM, its ablations, LoRA of matched size; `experiments/slim_methods.py`) and
seed, the base model gets the method's adapters on the target layers and trains with the shared
trainer (`slim_jax.train.Trainer`: same steps, batch and learning rate for all); then downstream
accuracy and general capability are measured (`slim_jax.eval`), and forgetting is the drop of
the general measure from the base model. The run folder (`--out`; by default a new
`runs/slim_finetune/<preset>-<time>`):

    <out>/command.txt, config.json      the exact command, the full resolved config
    <out>/FINISHED                      written last, when every run is done
    <out>/results.json, results.md      every run's record; the table (mean ± std over seeds)
    <out>/loss_curves.png               training loss per method
    <out>/tradeoff.png                  downstream accuracy against forgetting per method
    <out>/stories.json                  (stories measure) the base model's stories, token ids
    <out>/base/base.json, predictions.jsonl  the base model's measures and answers
    <out>/runs/<method>/seed<k>/        result.json, predictions.jsonl, the trainer's
                                        metrics.jsonl and loss.png, evals.jsonl (with
                                        --eval.curve-every: the curve's points),
                                        checkpoints/ (orbax:
                                        adapters, SLIM cluster state, optimiser), and for
                                        `lora` peft/ (the adapter in PEFT's format; PEFT has no
                                        mixture-of-experts format, so SLIM adapters stay orbax)

Stop and resume: SIGTERM, SIGINT or SIGUSR1 (also to one of the worker processes' parent only)
makes every run save a checkpoint; the command prints one line naming what is saved and the
command that resumes, and exits 128 + the signal's number. Running the same command with the same
`--out` resumes: finished runs (`result.json` present) are kept, interrupted ones continue from
their checkpoints (`--train.save-every` steps apart), and the tables come out as an uninterrupted
run's. An `--out` holding a finished run is refused unless `--overwrite`.

Examples:
    python -m experiments.slim_finetune                       # the cpu preset, everything
    python -m experiments.slim_finetune --methods slim,lora --seeds 0 --train.steps 30
    python -m experiments.slim_finetune --preset pod_multi --model.path /ckpt/openchat-8b
    python -m experiments.slim_finetune --help                # every field and its default
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from experiments.cli import parse_config, run_command
from experiments.presets.slim import PRESETS, SlimExperiment
from experiments.run_folder import resolve_out
from experiments.run_state import (
    mark_finished,
    open_run_folder,
    read_json,
    stop_message,
    write_atomic,
    write_json,
)
from experiments.slim_methods import Method, make_method, target_shapes
from experiments.slim_report import (
    curve_comparison,
    curves_by_method,
    markdown_curve_table,
    markdown_table,
    plot_losses,
    plot_tradeoff,
    summarize,
)
from experiments.slim_setup import (
    Context,
    check_config,
    curve_evaluation,
    evaluate_downstream,
    load_checked,
    prepare,
    resolve_inputs,
    write_predictions,
)
from experiments.slim_tune import apply_setting, check_tune, setting_for, write_tuned
from slim_jax.data import BatchIterator
from slim_jax.eval import forgetting_by_measure
from slim_jax.models.peft_io import save_peft
from slim_jax.nn import inference_view, inject
from slim_jax.parallel import initialize_distributed
from slim_jax.settings import enable_compilation_cache
from slim_jax.train import Trainer, TrainResult, read_metrics
from slim_jax.train.metrics import count_params
from slim_jax.train.workers import Stopped, StopSignals, WorkerPool, active

RESULT = "result.json"  # a run's record: written last, so present means finished
PROG = "python -m experiments.slim_finetune"


def parse_cli(argv: Sequence[str] | None = None) -> SlimExperiment:
    """The experiment config from the command line: `--preset` first, then field overrides.

    Raises:
      ConfigError: an unknown preset, or an override the config's validation rejects.
    """
    return parse_config(PROG, __doc__, PRESETS, argv)


# -- one run ------------------------------------------------------------------------------------

def steps_for(config: SlimExperiment, num_examples: int) -> int:
    """Training steps: `data.epochs` passes when set, else `train.steps`."""
    if config.data.epochs > 0:
        return max(1, round(config.data.epochs * num_examples / config.data.batch_size))
    return config.train.steps


def run_dir(out: Path, method: str, seed: int, trial: int | None = None) -> Path:
    """The folder of one method x seed run, or of one tuning trial (`out` is then the tuning
    folder, `<run folder>/tuning`)."""
    return out / "runs" / method / (f"seed{seed}" if trial is None else f"trial{trial}")


def final_ce(metrics_path: Path, steps: int) -> float:
    """Mean logged training cross-entropy over the last tenth of the steps (each step once,
    the newest record of a step kept, so a resumed run reads as an uninterrupted one)."""
    by_step = {int(r["step"]): r["ce"] for r in read_metrics(metrics_path)}
    tail = [ce for step, ce in sorted(by_step.items()) if step > steps - max(1, steps // 10)]
    return sum(tail) / len(tail) if tail else float("nan")


def run_method(ctx: Context, method_name: str, seed: int,
               trial: int | None = None) -> dict[str, Any]:
    """Train one method with one seed (resuming from its checkpoint if it has one), evaluate it,
    save its adapters and its `result.json` last. Returns `{"record": ...}` when finished, or
    `{"stopped": what is saved}` when a stop request cut training short. With `trial`, it is
    that tuning trial of the method (`experiments/slim_tune.py`)."""
    stop = active() or StopSignals()
    setting = setting_for(ctx, method_name, trial)
    config = apply_setting(ctx.config, setting)
    folder = run_dir(ctx.out, method_name, seed, trial)
    unit = f"{method_name} seed {seed}" if trial is None else f"{method_name} trial {trial}"
    steps = steps_for(config, len(ctx.train_data))
    with stop.interruptible():
        model = nnx.clone(ctx.base_model)
        method: Method = make_method(method_name, config.slim,
                                     target_shapes(model, config.targets))
        inject(model, config.targets, method.adapter, rngs=nnx.Rngs(seed))
        train_config = dataclasses.replace(
            config.train, steps=steps, run_dir=str(folder),
            l1_coeff=config.train.l1_coeff if method.l1 else 0.0)
        batches = BatchIterator(ctx.train_data, ctx.layout,
                                global_batch_size=config.data.batch_size, seed=seed,
                                pack=config.data.pack, process_index=jax.process_index(),
                                process_count=jax.process_count())
        trainer = Trainer(model, train_config, devices=ctx.devices)
    start = time.perf_counter()
    if (folder / "checkpoints").is_dir():
        print(f"[{unit}] resuming from its checkpoint", flush=True)
    result: TrainResult = trainer.fit(batches, evaluate=curve_evaluation(ctx))
    train_seconds = time.perf_counter() - start
    if result.stopped == "preempted" or stop.requested:
        stop.request(result.signal or "SIGTERM")  # the trainer's guard heard the signal first
        return {"stopped": f"{unit} at step {result.checkpoint_step} "
                           f"({folder / 'checkpoints'})"}
    start = time.perf_counter()
    with stop.interruptible():
        trained = inference_view(trainer.model())
        downstream, by_likelihood = evaluate_downstream(config, ctx.tokenizer, ctx.task, trained)
        general = ctx.capability.measure(trained)
    eval_seconds = time.perf_counter() - start
    if ctx.leader:
        write_predictions(folder / "predictions.jsonl", ctx.task, downstream)
        if method_name == "lora":
            save_peft(trainer.model(), folder / "peft", base_model_name_or_path=ctx.base_path)
    headline = ctx.capability.headline
    drops = forgetting_by_measure(ctx.capability, ctx.base["general"], general)
    record = {
        "method": method_name, "seed": seed, "trial": trial, "setting": setting,
        "steps": result.step, "stopped": result.stopped,
        "adapter": {"type": type(method.adapter).__name__,
                    **dataclasses.asdict(method.adapter)},
        "l1_coeff": train_config.l1_coeff,
        "trainable_params": count_params(trainer.state.params),
        "final_ce": final_ce(folder / "metrics.jsonl", result.step),
        "downstream": downstream.accuracy, "downstream_likelihood": by_likelihood,
        "general": general, "general_score": general[headline],
        "forgetting": drops[headline], "forgetting_by_measure": drops,
        "train_seconds": train_seconds, "eval_seconds": eval_seconds,
        "checkpoint": str(folder / "checkpoints"),
        "curve": result.evals,  # --eval.curve-every: the points along training (evals.jsonl)
    }
    if ctx.leader:
        write_json(folder / RESULT, record)  # last: the run counts as finished from here
    print(f"[{unit}] {result.step} steps in {train_seconds:.1f}s (final "
          f"cross-entropy {record['final_ce']:.3f}); downstream {100 * downstream.accuracy:.1f}%"
          + ("" if by_likelihood is None else f" (by likelihood {100 * by_likelihood:.1f}%)")
          + f", {headline} {general[headline]:.4f} (forgetting {drops[headline]:+.4f}); "
          f"eval {eval_seconds:.1f}s", flush=True)
    return {"record": record}


def _worker_init(config: SlimExperiment, folder: Path | None, out: Path) -> Context:
    enable_compilation_cache(config.compilation_cache)
    return prepare(config, folder, out)


def _worker_run(ctx: Context, method: str, seed: int, trial: int | None) -> dict[str, Any]:
    return run_method(ctx, method, seed, trial)


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


# -- the experiment ----------------------------------------------------------------------------

def run_experiment(config: SlimExperiment, argv: Sequence[str], stop: StopSignals) -> int:
    """Run every method and seed of `config` not finished yet in its run folder; write the
    results after each; return the exit status (0 done, 128 + signal when stopped).

    Raises:
      SlimJaxError: bad input (unknown method, missing data or model, invalid config), before
        any model is loaded.
    """
    check_config(config)
    check_tune(config)
    folder = resolve_inputs(config)
    out = resolve_out(config.out, "slim_finetune", config.preset)
    config = dataclasses.replace(config, out=str(out))  # config.json records where it went
    command = shlex.join([*PROG.split(), *argv])
    open_run_folder(out, dataclasses.asdict(config), overwrite=config.overwrite, create=False)
    enable_compilation_cache(config.compilation_cache)
    clock = time.perf_counter()
    loaded = load_checked(config, folder)  # lengths against its positions, before any writing
    if jax.process_index() == 0:  # one process writes the folder (a shared disk)
        resumed = open_run_folder(out, dataclasses.asdict(config), overwrite=config.overwrite)
        write_atomic(out / "command.txt", command + "\n")
    else:
        resumed = (out / "config.json").is_file()
    if config.tune.trials:  # the tuning trials first, on a validation split, then the runs
        tuning = dataclasses.replace(config, task=dataclasses.replace(config.task,
                                                                      validation=True))
        code = _run_phase(tuning, folder, out / "tuning", loaded, stop, argv, command, clock,
                          resumed, top=out)
        if code is not None:
            return code
    code = _run_phase(config, folder, out, loaded, stop, argv, command, clock, resumed, top=out)
    if code is not None:
        return code
    print(f"done in {time.perf_counter() - clock:.0f}s; results in {out / 'results.md'}",
          flush=True)
    return 0


Job = tuple[str, int, int | None]  # (method, seed, tuning trial or None)


def _run_phase(config: SlimExperiment, folder: Path | None, out: Path,
               loaded: tuple[Any, ...], stop: StopSignals, argv: Sequence[str], command: str,
               clock: float, resumed: bool, *, top: Path) -> int | None:
    """Run the unfinished units of one phase in `out`: the tuning trials (when `out` is the
    tuning folder, `config` on the validation split) or the final method x seed runs. Returns
    the exit status when a stop cut it short, else None (everything finished and written)."""
    trials = out != top
    try:
        ctx = prepare(config, folder, out, loaded)
    except Stopped:
        print(stop_message(PROG, stop.requested or "SIGTERM", [f"the run folder {top}"], argv,
                           top), file=sys.stderr, flush=True)
        return stop.exit_code
    if trials:
        pairs = schedule(config.methods, range(config.tune.trials), config.workers)
        jobs: list[Job] = [(m, config.tune.seed, k) for m, k in pairs]
    else:
        jobs = [(m, s, None) for m, s in schedule(config.methods, config.seeds, config.workers)]
    finished = {job: read_json(run_dir(out, *job) / RESULT) for job in jobs}
    runs = [r for r in finished.values() if r is not None]
    todo = [job for job in jobs if finished[job] is None]
    units = "tuning trials" if trials else "runs"
    print(("tuning: " if trials else "")
          + f"task {ctx.task.name}: {len(ctx.task.train)} training / {len(ctx.task.test)} "
          f"{'validation' if trials else 'test'} examples (majority answer "
          f"{100 * ctx.base['majority']:.1f}%); base model: downstream "
          f"{100 * ctx.base['downstream']:.1f}%, {ctx.capability.headline} "
          f"{ctx.base['general_score']:.4f}; methods {', '.join(config.methods)}; "
          + (f"{config.tune.trials} trials each (seed {config.tune.seed})" if trials
             else f"seeds {', '.join(map(str, config.seeds))}")
          + (f"; resuming: {len(runs)} of {len(jobs)} {units} finished" if resumed else ""),
          flush=True)
    saved: list[str] = []

    def collect(job: Job, value: dict[str, Any] | None) -> None:
        if value is not None and "record" in value:
            runs.append(value["record"])
            if ctx.leader and not trials:
                _write_results(ctx, _ordered(runs, config.methods), command,
                               time.perf_counter() - clock)
        else:
            saved.append(value["stopped"] if value else f"{job[0]} seed {job[1]}: its last "
                         f"checkpoint, if any ({run_dir(out, *job) / 'checkpoints'})")

    if config.workers == 1:
        for job in todo:
            if stop.requested:
                break
            try:
                collect(job, run_method(ctx, *job))
            except Stopped:
                collect(job, None)
    else:
        pool = WorkerPool(config.workers, _worker_init, (config, folder, out), _worker_run)
        for outcome in pool.run(todo, stop):
            collect(outcome.job, outcome.value)  # type: ignore[arg-type]
    if stop.requested and len(runs) < len(jobs):
        what = [f"{len(runs)} of {len(jobs)} {units} finished"
                + ("" if trials else f" ({out / 'results.json'})"), *saved]
        print(stop_message(PROG, stop.requested, what, argv, top), file=sys.stderr, flush=True)
        return stop.exit_code
    if trials:
        write_tuned(ctx, runs, top)
    elif ctx.leader:
        _write_results(ctx, _ordered(runs, config.methods), command, time.perf_counter() - clock)
        mark_finished(out)
    return None


def _ordered(runs: list[dict[str, Any]], methods: Sequence[str]) -> list[dict[str, Any]]:
    """Runs by method (in `methods` order), then seed: workers finish in any order."""
    return sorted(runs, key=lambda r: (list(methods).index(r["method"]), r["seed"]))


def _write_results(ctx: Context, runs: list[dict[str, Any]], command: str,
                   seconds: float) -> dict[str, Any]:
    """Write results.json, results.md and the plots from the runs finished so far."""
    config, cap = ctx.config, ctx.capability
    higher = cap.higher_is_better(cap.headline)
    summary = summarize(runs, config.methods)
    along = curve_comparison(runs, config.methods, ctx.base)
    results = {
        "preset": config.preset, "task": ctx.task.name, "num_train": len(ctx.task.train),
        "num_test": len(ctx.task.test), "general_headline": cap.headline,
        "general_higher_is_better": higher, "base": ctx.base, "summary": summary, "runs": runs,
        "wall_seconds": seconds, "devices": [str(d) for d in ctx.devices],
        "curve_comparison": along,
    }
    write_json(ctx.out / "results.json", results)
    table = markdown_table(summary, ctx.base, headline=cap.headline, higher_is_better=higher)
    write_atomic(ctx.out / "results.md",
                 f"# SLIM experiment: preset `{config.preset}`, task `{ctx.task.name}`\n\n"
                 f"Command: `{command}`\n\n"
                 f"{len(ctx.task.train)} training / {len(ctx.task.test)} test examples; majority "
                 f"answer {100 * ctx.base['majority']:.1f}%. Mean ± std over seeds; wall time "
                 f"{seconds:.0f}s.\n\n" + table
                 + ("" if along is None else
                    "\n## Along training (`--eval.curve-every`)\n\nEvery seed's path starts at "
                    "the base model and joins its curve points (downstream accuracy on the "
                    "curve's evaluation subset); see `curve_comparison` in "
                    "experiments/slim_report.py.\n\n" + markdown_curve_table(along)))
    by_method: dict[str, list[str]] = {}
    for r in runs:
        by_method.setdefault(r["method"], []).append(str(Path(r["checkpoint"]).parent))
    title = (f"task {ctx.task.name}, preset {config.preset}, "
             f"{len(config.seeds)} seed{'s' * (len(config.seeds) != 1)}")
    plot_losses(by_method, ctx.out / "loss_curves.png", title=title)
    plot_tradeoff(summary, ctx.base, ctx.out / "tradeoff.png", headline=cap.headline, title=title,
                  curves=curves_by_method(runs, config.methods))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """The command line. Returns 0 when done, 2 on bad input (one line on stderr, no
    traceback), 128 + the signal's number when a stop signal stopped it (checkpoints and
    finished runs saved; one line says how to resume); with `--compile-only true`, 0 when the
    preset's step fits `--topology` and 1 when it does not."""
    def run(config: SlimExperiment, args: list[str], stop: StopSignals) -> int:
        if config.compile_only:  # compile for --topology and report; no weights, no data
            from experiments.compile_only import slim_compile_only

            return slim_compile_only(config)
        initialize_distributed()  # joins the job when a launcher started several processes
        return run_experiment(config, args, stop)

    return run_command(PROG, argv, parse_cli, run)


if __name__ == "__main__":
    sys.exit(main())
