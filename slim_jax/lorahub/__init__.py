"""LoRAHub: gradient-free composition of LoRA modules for an unseen task (LORAHUB.md).

- `library`: load N LoRA modules (PEFT directories or slim_jax adapters), check, stack, attach.
- `objective`: the few-shot loss of a composition plus `0.05 * mean|w|`, for a population at once.
- `search`: evosax CMA-ES (vmapped population, `lax.scan` loop), COBYLA (the reference's), Adam.
"""

from slim_jax.lorahub.library import (
    AttachedLibrary,
    LibraryError,
    LoRAModule,
    ModuleLibrary,
    check_modules,
    load_module,
    module_from_model,
)
from slim_jax.lorahub.objective import (
    L1_COEFF,
    LOSS_MODES,
    Objective,
    build_objective,
    is_encoder_decoder,
    objective_layout,
)
from slim_jax.lorahub.search import (
    SEARCHES,
    SearchResult,
    cmaes_search,
    cobyla_search,
    fold,
    gradient_search,
    population_mesh,
    score_candidates,
    score_population,
    search,
)

__all__ = [
    "L1_COEFF",
    "LOSS_MODES",
    "SEARCHES",
    "AttachedLibrary",
    "LibraryError",
    "LoRAModule",
    "ModuleLibrary",
    "Objective",
    "SearchResult",
    "build_objective",
    "check_modules",
    "cmaes_search",
    "cobyla_search",
    "fold",
    "gradient_search",
    "is_encoder_decoder",
    "load_module",
    "module_from_model",
    "objective_layout",
    "population_mesh",
    "score_candidates",
    "score_population",
    "search",
]
