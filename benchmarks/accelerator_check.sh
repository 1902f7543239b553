#!/usr/bin/env bash
# Accelerator check on one GPU (written for an H200; at most 7.5 minutes: every section has a
# time limit), after the README's CUDA
# install (pip install -e ".[cuda,test]"):
#
#   bash benchmarks/accelerator_check.sh            # on the GPU machine
#   SMOKE=1 bash benchmarks/accelerator_check.sh    # tiny shapes on CPU: checks the script runs
#
# 1. JAX sees a GPU (one line and exit 1 if not; SMOKE skips this);
# 2. the model and adapter tests (tests/models, tests/nn) on the GPU;
# 3. bf16 logits against float32 logits of the same random Llama-1B-shaped model;
# 4. SLIM and LoRA training steps at Llama-3.2-1B and Llama-3-8B shapes, random weights:
#    tokens/s and MFU (the trainer's 4 N_frozen + 6 N_trained FLOPs per token);
# 5. LoRAHub population scoring at FLAN-T5-large shapes (20 modules, K=5, 256 input tokens),
#    P = 1, 4, 16, 64: candidates/s of one vmapped call against one forward pass per candidate.
# Each section has a time limit and prints its own timing; the figures go to stdout (save them:
# `... | tee accelerator_check.txt`) and belong in benchmarks/POD.md.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
smoke="${SMOKE:-0}"
status=0

section() {  # name, time limit (s; x4 in SMOKE mode, for a slow CPU), command...
  local name="$1" limit="$2"; shift 2
  [[ "$smoke" == 1 ]] && limit=$(( limit * 4 ))
  local start; start=$(date +%s)
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@"
  local rc=$?
  echo "=== $name: exit $rc after $(( $(date +%s) - start ))s"
  [[ $rc -ne 0 ]] && status=1
  return 0
}

if [[ "$smoke" == 1 ]]; then
  export JAX_PLATFORMS=cpu
else
  export JAX_PLATFORMS=cuda
  # One process owns the GPU: let XLA take most of it (tests and benchmarks run one at a time).
  export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
  python launch/check_platform.py gpu || exit 1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
python -c "import jax; print('jax', jax.__version__, jax.devices())"

if [[ "$smoke" != 1 ]]; then
  # tests/conftest.py defaults JAX_PLATFORMS to cpu; the exported cuda wins. Tests that need 8
  # devices (meshes) are skipped or use what there is.
  section "model tests on the GPU" 90 python -m pytest -q -x tests/models tests/nn -p no:randomly
fi

section "bf16 logits against float32" 40 python - "$smoke" <<'EOF'
import sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from slim_jax.models.llama import Llama, LlamaConfig
from slim_jax.train.aot import architecture

smoke = sys.argv[1] == "1"
arch = dict(architecture("llama-3.2-1b"))
if smoke:
    arch.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=16,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
f32 = LlamaConfig.from_hf(arch)
model = Llama(f32, rngs=nnx.Rngs(0))
tokens = jax.random.randint(jax.random.key(1), (4, 128), 0, f32.vocab_size)
ref = np.asarray(jax.jit(lambda m, t: m(t))(model, tokens), np.float32)
state = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating)
                     else x, nnx.state(model))
bf16_model = Llama(LlamaConfig.from_hf(arch, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16),
                   rngs=nnx.Rngs(0))
nnx.update(bf16_model, state)
out = np.asarray(jax.jit(lambda m, t: m(t))(bf16_model, tokens), np.float32)
rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
agree = float(np.mean(out.argmax(-1) == ref.argmax(-1)))
print(f"bf16 vs float32 logits: relative L2 error {rel:.4f}, max abs {np.abs(out - ref).max():.3f},"
      f" top-1 agreement {agree:.3f}")
sys.exit(0 if rel < 0.05 else 1)
EOF

section "SLIM and LoRA training steps, 1B and 8B shapes" 230 python - "$smoke" <<'EOF'
import sys, time
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from slim_jax.nn import LoRAConfig, SlimConfig, inject
from slim_jax.parallel import MeshConfig, create_sharded, make_mesh
from slim_jax.train.aot import architecture, model_factory
from slim_jax.train import OptimizerConfig, TrainConfig, Trainer

smoke = sys.argv[1] == "1"
TARGETS = r"(q|k|v|o|gate|up|down)_proj$"
ADAPTERS = {
    "slim": (SlimConfig(num_lora_experts=8, num_identity_experts=2, top_k=2, rank=16, alpha=32,
                        num_clusters=8, dropmerge_p=0.3, yield_quantile=0.9), 1e-3),
    "lora": (LoRAConfig(rank=16, alpha=32), 0.0),
}
SHAPES = {"1b": ("llama-3.2-1b", 8, 1024), "8b": ("llama-3-8b", 4, 1024)}
mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
for size, (name, batch_size, seq) in SHAPES.items():
    arch = dict(architecture(name))
    if smoke:
        arch.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=16,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
        batch_size, seq = 2, 32
    factory = model_factory(arch, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    for method, (adapter, l1) in ADAPTERS.items():
        def create(adapter=adapter):
            model = factory()
            inject(model, TARGETS, adapter, rngs=nnx.Rngs(1))
            return model
        model = create_sharded(create, mesh)  # random weights, built on the device
        config = TrainConfig(steps=100, l1_coeff=l1, frozen_dtype="bfloat16", progress=False,
                             save_every=0, mesh=MeshConfig(data=1),
                             optimizer=OptimizerConfig(warmup_steps=0))
        trainer = Trainer(model, config, mesh=mesh)
        del model
        rng = np.random.default_rng(0)
        vocab = arch["vocab_size"]
        batch = {"tokens": rng.integers(0, vocab, (batch_size, seq), dtype=np.int32),
                 "positions": np.tile(np.arange(seq, dtype=np.int32), (batch_size, 1)),
                 "segment_ids": np.ones((batch_size, seq), np.int32),
                 "targets": rng.integers(0, vocab, (batch_size, seq), dtype=np.int32),
                 "target_mask": np.ones((batch_size, seq), np.float32)}
        start = time.perf_counter()
        float(trainer.train_step(batch)["loss"])  # compile + first step
        compile_s = time.perf_counter() - start
        steps = 2 if smoke else 5
        start = time.perf_counter()
        for _ in range(steps):
            metrics = trainer.train_step(batch)
        float(metrics["loss"])
        seconds = (time.perf_counter() - start) / steps
        tokens_s = batch_size * seq / seconds
        mfu = ("n/a" if trainer.peak_flops is None
               else f"{trainer.flops_per_token * tokens_s / trainer.peak_flops:.3f}")
        print(f"{size} {method}: batch {batch_size}x{seq}, first step {compile_s:.1f} s, "
              f"{seconds * 1e3:.0f} ms/step, {tokens_s:,.0f} tokens/s, MFU {mfu}", flush=True)
        del trainer
EOF

section "LoRAHub population scoring, FLAN-T5-large shapes" 90 python - "$smoke" <<'EOF'
import sys, time
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from slim_jax.lorahub.library import ModuleLibrary
from slim_jax.lorahub.objective import Objective
from slim_jax.lorahub.search import score_candidates
from slim_jax.nn import module_path
from slim_jax.train.aot import architecture, model_factory

smoke = sys.argv[1] == "1"
arch = dict(architecture("flan-t5-large"))
n, rank, k, enc, dec = 20, 16, 5, 256, 32
if smoke:
    arch.update(d_model=64, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=16,
                vocab_size=512)
    n, enc, dec = 4, 32, 8
model = jax.jit(lambda: nnx.split(model_factory(arch)()))()
model = nnx.merge(*model)
shapes = {module_path(p): (m.in_features, m.out_features) for p, m in nnx.iter_modules(model)
          if type(m) is nnx.Linear and module_path(p).endswith(("/q", "/v"))}
rng = np.random.default_rng(0)
a = {p: jnp.asarray(rng.normal(0, 0.02, (n, i, rank)), jnp.float32) for p, (i, _) in shapes.items()}
b = {p: jnp.asarray(rng.normal(0, 0.02, (n, rank, o)), jnp.float32) for p, (_, o) in shapes.items()}
library = ModuleLibrary(tuple(f"m{i}" for i in range(n)), rank, 32.0, False, a, b).attach(model)
vocab = arch["vocab_size"]
batches = {"enc_tokens": rng.integers(2, vocab, (1, k, enc)), "enc_segment_ids": np.ones((1, k, enc)),
           "dec_tokens": rng.integers(2, vocab, (1, k, dec)), "dec_segment_ids": np.ones((1, k, dec)),
           "targets": rng.integers(2, vocab, (1, k, dec)), "target_mask": np.ones((1, k, dec))}
batches = {key: jnp.asarray(v, jnp.float32 if key == "target_mask" else jnp.int32)
           for key, v in batches.items()}
objective = Objective(library, batches, k)

def rate(scoring, p):
    w = jnp.asarray(rng.normal(0, 0.3, (p, n)), jnp.float32)
    score_candidates(objective, w, scoring=scoring).block_until_ready()  # compile
    reps = 3
    start = time.perf_counter()
    for _ in range(reps):
        score_candidates(objective, w, scoring=scoring).block_until_ready()
    return p * reps / (time.perf_counter() - start)

# One forward pass per candidate costs the same whatever P: measured once, at P = 4.
sequential = rate("sequential", 4)
print(f"sequential: {sequential:.1f} candidates/s", flush=True)
for p in (1, 4, 16, 64):
    vmap = rate("vmap", p)
    print(f"P={p:2d}: vmap {vmap:8.1f} candidates/s, x{vmap / sequential:.1f} sequential",
          flush=True)
EOF

echo "accelerator check: $([[ $status == 0 ]] && echo passed || echo 'FAILED (see the sections above)')"
exit $status
