"""LoRAHub: gradient-free composition of LoRA modules for an unseen task (LORAHUB.md).

- `library`: load N LoRA modules (PEFT directories or slim_jax adapters), check, stack, attach.
- `objective`: the few-shot loss of a composition plus `0.05 * mean|w|`, for a population at once.
- `search`: every search by name (`SEARCHES`): evosax strategies with a vmapped population and a
  compiled `lax.while_loop` over the generations (`evolution`: CMA-ES, separable CMA-ES, SNES,
  singles-first, IPOP restarts), COBYLA as the reference runs it, Adam; all return a `SearchResult`.
- `predict`, `protocol`, `report`: BIG-Bench Hard answers, the paper's protocol, tables and plots.
- `upstream`: train LoRA modules on the T0 template tasks named like LoRAHub's, save as PEFT.

>>> import numpy as np
>>> from slim_jax.lorahub import LoRAModule, ModuleLibrary
>>> mods = [LoRAModule(f"m{i}", 1, 1.0, {"q": (np.ones((2, 1)), np.ones((1, 2)))})
...         for i in range(3)]
>>> ModuleLibrary.from_modules(mods).num_modules
3
"""

from slim_jax.lorahub.library import (
    AttachedLibrary,
    LibraryError,
    LoRAModule,
    ModuleLibrary,
    check_modules,
    find_module,
    load_module,
    module_from_model,
)
from slim_jax.lorahub.objective import (
    L1_COEFF,
    LOSS_MODES,
    Objective,
    build_objective,
    objective_layout,
)
from slim_jax.lorahub.predict import greedy_answers
from slim_jax.lorahub.protocol import (
    ProtocolConfig,
    RunResult,
    TargetTask,
    TaskResult,
    module_draws,
    run_bbh_task,
)
from slim_jax.lorahub.report import plot_search_progress, results_json, results_table
from slim_jax.lorahub.search import (
    DEFAULT_SEARCH,
    SEARCHES,
    STRATEGIES,
    Search,
    SearchResult,
    bounce,
    cmaes_search,
    cobyla_search,
    evolution_search,
    gradient_search,
    population_mesh,
    score_candidates,
    score_population,
    search,
)
from slim_jax.lorahub.upstream import (
    UpstreamConfig,
    read_module_ids,
    save_module,
    train_module,
    upstream_task_names,
)

__all__ = [
    "DEFAULT_SEARCH",
    "L1_COEFF",
    "LOSS_MODES",
    "SEARCHES",
    "STRATEGIES",
    "AttachedLibrary",
    "LibraryError",
    "LoRAModule",
    "ModuleLibrary",
    "Objective",
    "ProtocolConfig",
    "RunResult",
    "Search",
    "SearchResult",
    "TargetTask",
    "TaskResult",
    "UpstreamConfig",
    "bounce",
    "build_objective",
    "check_modules",
    "cmaes_search",
    "cobyla_search",
    "evolution_search",
    "find_module",
    "gradient_search",
    "greedy_answers",
    "load_module",
    "module_draws",
    "module_from_model",
    "objective_layout",
    "plot_search_progress",
    "population_mesh",
    "read_module_ids",
    "results_json",
    "results_table",
    "run_bbh_task",
    "save_module",
    "score_candidates",
    "score_population",
    "search",
    "train_module",
    "upstream_task_names",
]
