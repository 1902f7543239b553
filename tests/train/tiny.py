"""A tiny Llama with adapters and a synthetic data stream, shared by the training tests and the
multi-process worker (loaded by path: `load_tiny()` in conftest.py, `sys.path` in the worker)."""

from __future__ import annotations

import dataclasses
import os
import signal

import jax
import jax.numpy as jnp
from flax import nnx

from slim_jax.data import BatchIterator, ByteTokenizer, CausalLayout, Example, tokenize_examples
from slim_jax.models.llama import Llama, LlamaConfig
from slim_jax.nn import AdapterParam, LoRAConfig, SlimConfig, inject
from slim_jax.parallel import MeshConfig
from slim_jax.train import OptimizerConfig, TrainConfig

SEQ = 16
SLIM = SlimConfig(num_lora_experts=4, num_identity_experts=2, top_k=2, rank=2, alpha=4,
                  num_clusters=2)
LORA = LoRAConfig(rank=2, alpha=4)


def tiny_model(adapter: str = "slim", seed: int = 0) -> Llama:
    """One-layer Llama (vocab of the byte tokenizer) with SLIM or LoRA on q_proj and down_proj.

    B factors start small and non-zero, so every adapter parameter gets a gradient at step 1.
    """
    config = LlamaConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=16,
                         intermediate_size=32, num_layers=1, num_heads=4, num_kv_heads=2)
    model = Llama(config, rngs=nnx.Rngs(seed))
    inject(model, r"q_proj|down_proj", SLIM if adapter == "slim" else LORA,
           rngs=nnx.Rngs(seed + 1))
    key = jax.random.key(seed + 2)
    for path, var in nnx.iter_graph(model):
        if isinstance(var, AdapterParam) and path[-1] in ("lora_b", "experts_b"):
            key, sub = jax.random.split(key)
            var.set_value(0.1 * jax.random.normal(sub, var.shape, var.dtype))
    return model


def examples(n: int = 48) -> list[Example]:
    """Arithmetic prompts with their answers (prompt + response fit in SEQ tokens)."""
    return [Example(f"{i % 7}+{i % 5}=", str(i % 7 + i % 5)) for i in range(n)]


def batches(global_batch: int = 8, *, seed: int = 0, process_index: int = 0,
            process_count: int = 1) -> BatchIterator:
    """A resumable, shuffled stream of packed [global_batch / process_count, SEQ] batches."""
    layout = CausalLayout(ByteTokenizer(), lengths=(SEQ,))
    data = tokenize_examples(examples(), layout)
    return BatchIterator(data, layout, global_batch_size=global_batch, seed=seed, pack=True,
                         process_index=process_index, process_count=process_count)


def train_config(mesh: MeshConfig | None = None, **overrides) -> TrainConfig:
    """A short run: 4 steps, lr 1e-2 (no warm-up: step 1 already moves), L1 on, no bar; one
    device unless `mesh` says otherwise."""
    base = TrainConfig(steps=4, mesh=mesh or MeshConfig(data=1), l1_coeff=0.01, progress=False,
                       log_every=1, save_every=0, async_checkpoint=False,
                       optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=0))
    return dataclasses.replace(base, **overrides)


def max_abs_diff(a, b) -> float:
    """Largest absolute difference between two trees of (possibly sharded) arrays."""
    diffs = jax.tree.map(lambda x, y: jnp.max(jnp.abs(jax.device_get(x) - jax.device_get(y))),
                         nnx.to_pure_dict(a) if isinstance(a, nnx.State) else a,
                         nnx.to_pure_dict(b) if isinstance(b, nnx.State) else b)
    return float(max(jax.tree.leaves(diffs)))


class StopAt:
    """Wraps a resumable batch iterator; sends this process `sig` once `at` batches are drawn
    (as a scheduler stopping the job while step `at` runs)."""

    def __init__(self, batches, at: int, sig: signal.Signals = signal.SIGTERM) -> None:
        self.batches, self.at, self.sig, self.drawn = batches, at, sig, 0

    def __next__(self):
        batch = next(self.batches)
        self.drawn += 1
        if self.drawn == self.at:
            os.kill(os.getpid(), self.sig)
        return batch

    def __iter__(self):
        return self

    def state(self):
        return self.batches.state()

    def restore(self, state):
        self.batches.restore(state)
