"""The tuning protocol of `python -m experiments.slim_finetune --tune.trials N`: the same budget of
trials for every method, each scored on a validation split of the training items, never on the
test items.

For each method, `N` settings are drawn (random search, seeded by `--tune.seed`; trial 0 is the
preset's own setting, so tuning can only match or beat it on validation):
- every method: the learning rate, log-uniform in `--tune.lr-range`;
- SLIM and its ablations, also: the L1 coefficient (`--tune.l1-coeffs`), top-k (`--tune.top-ks`,
  those the method's experts allow), the split of the preset's expert budget into LoRA experts x
  rank at matched parameters (`num_lora_experts * rank` and `alpha / rank` kept; the powers of two
  that divide the budget), and the yielding quantile (`--tune.yield-quantiles`; methods that
  yield).
Plain LoRA stays matched to the preset's SLIM size (its rank follows `slim`'s budget, which the
split keeps). Each trial trains seed `--tune.seed` with `--task.validation` (the training items
split again into fit and validation items; the test items are not loaded) and is scored by
validation accuracy minus `--tune.forgetting-weight` times forgetting. The best trial of each
method is written to `<out>/tuned.json`, and the final runs (every seed, the test items) use it.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments.presets.slim import SlimExperiment
from experiments.run_state import read_json, write_atomic, write_json
from experiments.slim_methods import make_method
from experiments.slim_setup import Context
from slim_jax.errors import ConfigError

Setting = dict[str, Any]  # config field path ("train.optimizer.learning_rate") -> value
TUNED = "tuned.json"
LEARNING_RATE = "train.optimizer.learning_rate"


def check_tune(config: SlimExperiment) -> None:
    """Raise ConfigError (naming the flag) for tuning values out of range."""
    tune = config.tune
    if tune.trials < 0:
        raise ConfigError(f"--tune.trials must be >= 0 (0: no tuning), got {tune.trials}")
    if tune.trials == 0:
        return
    low, high = tune.lr_range
    if not 0 < low <= high:
        raise ConfigError(f"--tune.lr-range must be two learning rates 0 < low <= high, got "
                          f"{tune.lr_range}")
    if any(c < 0 for c in tune.l1_coeffs) or not tune.l1_coeffs:
        raise ConfigError(f"--tune.l1-coeffs must be one or more values >= 0, got "
                          f"{tune.l1_coeffs}")
    if not tune.top_ks or any(k < 1 for k in tune.top_ks):
        raise ConfigError(f"--tune.top-ks must be one or more integers >= 1, got {tune.top_ks}")
    if not tune.yield_quantiles or any(not 0 < q < 1 for q in tune.yield_quantiles):
        raise ConfigError(f"--tune.yield-quantiles must be one or more values in (0, 1), got "
                          f"{tune.yield_quantiles}")
    if config.task.kind != "t0":
        raise ConfigError(f"--tune.trials scores trials on a validation split of the training "
                          f"items, which --task.kind {config.task.kind} does not have: use "
                          f"--task.kind t0, or --tune.trials 0")


def expert_splits(config: SlimExperiment) -> list[tuple[int, int]]:
    """The (LoRA experts, rank) pairs with the preset's `num_lora_experts * rank`, powers of two.

    >>> from experiments.presets.slim import CPU
    >>> expert_splits(CPU)  # the cpu preset: 4 experts of rank 4
    [(1, 16), (2, 8), (4, 4), (8, 2), (16, 1)]
    """
    budget = config.slim.num_lora_experts * config.slim.rank
    return [(e, budget // e) for e in (2 ** i for i in range(budget.bit_length()))
            if budget % e == 0]


def preset_setting(method: str, config: SlimExperiment) -> Setting:
    """The preset's own values of the fields `draw_settings` varies for `method`."""
    slim = config.slim
    setting: Setting = {LEARNING_RATE: config.train.optimizer.learning_rate}
    if method == "lora":
        return setting
    setting.update({"train.l1_coeff": config.train.l1_coeff, "slim.top_k": slim.top_k,
                    "slim.num_lora_experts": slim.num_lora_experts, "slim.rank": slim.rank,
                    "slim.alpha": slim.alpha})
    if _yields(method, config):
        setting["slim.yield_quantile"] = slim.yield_quantile
    return setting


def _yields(method: str, config: SlimExperiment) -> bool:
    adapter = make_method(method, config.slim, [(1, 1)]).adapter
    return bool(getattr(adapter, "yielding", False))


def draw_settings(method: str, config: SlimExperiment) -> list[Setting]:
    """`config.tune.trials` settings of `method`: the preset's first, then seeded draws.

    >>> from experiments.presets.slim import CPU
    >>> cfg = dataclasses.replace(CPU, tune=dataclasses.replace(CPU.tune, trials=3))
    >>> [sorted(s) for s in draw_settings("lora", cfg)][1]
    ['train.optimizer.learning_rate']
    >>> draw_settings("slim", cfg) == draw_settings("slim", cfg)  # seeded
    True
    """
    tune = config.tune
    settings = [preset_setting(method, config)]
    rng = random.Random(f"{tune.seed}:{method}")
    splits = expert_splits(config)
    low, high = math.log(tune.lr_range[0]), math.log(tune.lr_range[1])
    scale = config.slim.alpha / config.slim.rank
    while len(settings) < tune.trials:
        setting: Setting = {LEARNING_RATE: float(f"{math.exp(rng.uniform(low, high)):.3g}")}
        if method != "lora":
            experts, rank = rng.choice(splits)
            total = experts + config.slim.num_identity_experts
            top_ks = [k for k in tune.top_ks if k <= total] or [min(total, config.slim.top_k)]
            setting.update({"train.l1_coeff": rng.choice(tune.l1_coeffs),
                            "slim.top_k": rng.choice(top_ks), "slim.num_lora_experts": experts,
                            "slim.rank": rank, "slim.alpha": scale * rank})
            if _yields(method, config):
                setting["slim.yield_quantile"] = rng.choice(tune.yield_quantiles)
        settings.append(setting)
    return settings


def apply_setting(config: SlimExperiment, setting: Mapping[str, Any]) -> SlimExperiment:
    """`config` with each dotted field path of `setting` replaced (validated as the CLI would).

    >>> from experiments.presets.slim import CPU
    >>> apply_setting(CPU, {LEARNING_RATE: 3e-3}).train.optimizer.learning_rate
    0.003
    """
    for path, value in setting.items():
        config = _replace_path(config, path.split("."), value)
    return config


def _replace_path(obj: Any, parts: Sequence[str], value: Any) -> Any:
    head, *rest = parts
    if not dataclasses.is_dataclass(obj) or head not in {f.name for f in dataclasses.fields(obj)}:
        raise ConfigError(f"tuned setting names an unknown config field {head!r}")
    inner = _replace_path(getattr(obj, head), rest, value) if rest else value
    return dataclasses.replace(obj, **{head: inner})


def score(record: Mapping[str, Any], forgetting_weight: float) -> float:
    """A trial's score: validation accuracy minus `forgetting_weight` x forgetting."""
    return float(record["downstream"]) - forgetting_weight * float(record["forgetting"])


def select(method: str, trials: Sequence[Mapping[str, Any]], forgetting_weight: float
           ) -> dict[str, Any]:
    """The best trial of `method` (the first on ties: the preset's setting wins a tie) and every
    trial's setting, validation accuracy, forgetting and score, for `tuned.json`.

    >>> trials = [{"trial": 0, "setting": {"lr": 1}, "downstream": 0.5, "forgetting": 0.1},
    ...           {"trial": 1, "setting": {"lr": 2}, "downstream": 0.7, "forgetting": 0.5}]
    >>> select("lora", trials, 0.0)["setting"], select("lora", trials, 1.0)["setting"]
    ({'lr': 2}, {'lr': 1})
    """
    rows = [{"trial": t["trial"], "setting": t["setting"], "validation": t["downstream"],
             "forgetting": t["forgetting"], "score": score(t, forgetting_weight)}
            for t in sorted(trials, key=lambda t: t["trial"])]
    best = max(rows, key=lambda r: (r["score"], -r["trial"]))
    return {"method": method, "trial": best["trial"], "setting": best["setting"],
            "validation": best["validation"], "forgetting": best["forgetting"], "trials": rows}


def tuning_table(tuned: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown: per method, every trial (setting, validation accuracy, forgetting, score), the
    chosen one in bold."""
    lines = ["| method | trial | setting | validation acc (%) | forgetting | score |",
             "|---|---|---|---|---|---|"]
    for method, chosen in tuned.items():
        for row in chosen["trials"]:
            mark = "**" if row["trial"] == chosen["trial"] else ""
            setting = ", ".join(f"{k.split('.')[-1]}={v:g}" if isinstance(v, float)
                                else f"{k.split('.')[-1]}={v}" for k, v in row["setting"].items())
            lines.append(f"| `{method}` | {mark}{row['trial']}{mark} | {setting} | "
                         f"{100 * row['validation']:.1f} | {row['forgetting']:.4f} | "
                         f"{row['score']:.4f} |")
    return "\n".join(lines) + "\n"


def setting_for(ctx: Context, method: str, trial: int | None) -> Setting:
    """The config fields a run changes: a tuning trial's draw, the tuned setting of a final run
    after tuning, else none."""
    if trial is not None:
        return draw_settings(method, ctx.config)[trial]
    tuned = read_json(ctx.out / TUNED) if ctx.config.tune.trials else None
    return dict(tuned[method]["setting"]) if tuned else {}


def write_tuned(ctx: Context, trials: list[dict[str, Any]], top: Path) -> None:
    """Choose each method's best trial; write `tuned.json` and `tuning.md` into the run folder
    (the final runs read `tuned.json`) and print the choices."""
    config = ctx.config
    tuned = {m: select(m, [t for t in trials if t["method"] == m], config.tune.forgetting_weight)
             for m in config.methods}
    if ctx.leader:
        write_json(top / TUNED, tuned)
        write_atomic(top / "tuning.md",
                     f"# Tuning: task `{ctx.task.name}`, preset `{config.preset}`\n\n"
                     f"{config.tune.trials} trials per method, seed {config.tune.seed}, scored "
                     f"on {len(ctx.task.test)} validation examples (the test items unread): "
                     f"validation accuracy - {config.tune.forgetting_weight:g} x forgetting. "
                     "Chosen trial in bold.\n\n" + tuning_table(tuned))
    for method, chosen in tuned.items():
        print(f"tuned {method}: trial {chosen['trial']} ({chosen['setting']}), validation "
              f"{100 * chosen['validation']:.1f}%, forgetting {chosen['forgetting']:+.4f}",
              flush=True)
