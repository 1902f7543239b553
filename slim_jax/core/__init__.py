"""The adapter mathematics of SLIM and LoRAHub as pure `jnp` functions (no Flax, no state).

Import from the submodules (each one job):
  lora        LoRA scale, delta `scale * (x A) B`, initialisers
  routing     top-k / dense gates, identity slots, mixture of LoRA experts
  clustering  sliding cluster statistics, distance d(x), weight yielding
  dropmerge   fast dynamic merging: channel masks, masked deltas
  merging     merge / unmerge into kernels; linear, task arithmetic, TIES, DARE
  compose     LoRAHub factor-wise composition, stacking, populations
  penalties   the SLIM L1 adapter penalty
"""
