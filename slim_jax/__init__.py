"""slim_jax: SLIM and LoRAHub adapters for JAX/Flax NNX.

Layers (imports run downwards only):
  slim_jax.core     pure jnp functions: LoRA delta, routing, clustering, dynamic merging, merging,
                    LoRAHub composition, penalties
  slim_jax.nn       Flax NNX modules over the core: LoRALinear, SlimLinear, inject, adapter state
  slim_jax.models   Llama-family and T5 models, checkpoint loading, PEFT interop, generation
  slim_jax.data     datasets pipeline, formatting, batching, BBH
  slim_jax.parallel / checkpoint / train / eval / lorahub
"""

__version__ = "0.1.0"
