"""Causal self-attention formulations on this CPU, side by side: which one should the models use?

Every form computes softmax(q k^T / sqrt(d) + causal mask) v with grouped-query heads (query head
h reads kv head h // (heads / kv_heads)), from q `[b, s, heads, d]` and k, v `[b, s, kv_heads, d]`
(the projections' layout), and returns `[b, s, heads, d]`:
  einsum     slim_jax's form before issue 14's blocks (copied here: the baseline): q grouped
             `[b, s, kv, g, d]`, scores `[b, kv, g, s, t]` in float32, masked with
             `where(mask, scores, finfo.min)` from a `[b, s, t]` boolean mask built once outside
             (as the model builds it once per forward), softmax, einsum back;
  bhsd       the same with q, k, v transposed to heads-major `[b, h, s, d]` first and back after;
  dpa        `jax.nn.dot_product_attention(..., is_causal=True, implementation="xla")`;
  blocked    queries in blocks of --block: block i attends to keys `[0, (i + 1) * block)` only,
             skipping the fully masked upper blocks (about half the score work at long s);
  slim_jax   the library's own `slim_jax.models.layers.attention(..., causal=True)`, what the
             Llama model runs without a cache (query blocks of `causal_block(s)`, heads-major);
  torch      PyTorch's `scaled_dot_product_attention(is_causal=True)` on `[b, h, s, d]`, the
             reference the Llama comparison in model_forward.py runs against (--torch).
Each form runs in float32 and, with --bf16, in bfloat16 (inputs and outputs bf16, scores f32 where
the form keeps them f32). Forward, and forward+backward (the gradient of sum(out * g) to q, k, v).
Outputs are checked against the float32 einsum first. benchmarks/harness.py times all forms round
robin, refuses a busy machine (--allow-busy) and pins threads (--threads).

    python benchmarks/attention_forms.py                 # the train-step shape: 1 x 512, 16 x 64
    python benchmarks/attention_forms.py --shape forward # model_forward's: 4 x 256, 8 / 4 x 32
    python benchmarks/attention_forms.py --shape forward-512 --bf16 --torch --threads 1

Prints one markdown table per pass (forward, forward+backward) with every form's median [IQR]
time and its speed against the current einsum form (> 1 = faster than einsum).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

import harness  # benchmarks/harness.py, beside this file

# name: (batch, seq, heads, kv_heads, head_dim) of the benchmarks' models
SHAPES = {
    "train": (1, 512, 16, 16, 64),  # train_step.py's default model
    "forward": (4, 256, 8, 4, 32),  # model_forward.py's default config
    "forward-512": (8, 256, 8, 4, 64),  # model_forward.py --hidden 512 --layers 8 --batch 8
}


def einsum_form(q, k, v, mask):
    """slim_jax's attention core before the causal blocks (issue 14): the baseline."""
    import jax
    import jax.numpy as jnp

    b, s, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, s, kv, h // kv, d)
    scores = jnp.einsum("bskgd,btkd->bkgst", q, k.astype(q.dtype),
                        preferred_element_type=jnp.float32) * d**-0.5
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v.astype(q.dtype))
    return out.reshape(b, s, h, d)


def bhsd_form(q, k, v, mask):
    """Heads-major: transpose to `[b, kv, g, s, d]` / `[b, kv, t, d]`, attend, transpose back."""
    import jax
    import jax.numpy as jnp

    b, s, h, d = q.shape
    kv = k.shape[2]
    qh = q.reshape(b, s, kv, h // kv, d).transpose(0, 2, 3, 1, 4)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    scores = jnp.einsum("bkgsd,bktd->bkgst", qh, kh, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None], scores * d**-0.5, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgst,bktd->bkgsd", probs, vh)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, s, h, d)


def dpa_form(q, k, v, mask):
    """`jax.nn.dot_product_attention` with its own causal mask (`mask` unused)."""
    import jax

    del mask
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")


def blocked_form(block: int) -> Callable:
    """Causal attention by query blocks that skips the fully masked key blocks."""

    def attend(q, k, v, mask):
        import jax
        import jax.numpy as jnp

        b, s, h, d = q.shape
        kv = k.shape[2]
        qg = q.reshape(b, s, kv, h // kv, d)
        outs = []
        for start in range(0, s, block):
            end = min(start + block, s)
            scores = jnp.einsum("bskgd,btkd->bkgst", qg[:, start:end], k[:, :end],
                                preferred_element_type=jnp.float32) * d**-0.5
            scores = jnp.where(mask[:, None, None, start:end, :end], scores,
                               jnp.finfo(jnp.float32).min)
            probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
            outs.append(jnp.einsum("bkgst,btkd->bskgd", probs, v[:, :end]))
        return jnp.concatenate(outs, axis=1).reshape(b, s, h, d)

    return attend


def library_form(q, k, v, mask):
    """`slim_jax.models.layers.attention` as the Llama model calls it without a cache."""
    from slim_jax.models.layers import attention

    b, s, h, d = q.shape
    out = attention(q, k, v, mask=mask, scale=d**-0.5, causal=True)
    return out.reshape(b, s, h, d)


def jax_fns(form: Callable, q, k, v, mask, dtype: str
            ) -> tuple[Callable[[], object], Callable[[], object], np.ndarray]:
    """Blocking forward and forward+backward calls of one form, and its forward output."""
    import jax
    import jax.numpy as jnp

    q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
    g = jnp.asarray(np.random.default_rng(3).standard_normal(q.shape), dtype)
    mask = jnp.asarray(mask)
    forward = jax.jit(form)
    grad = jax.jit(jax.grad(lambda q, k, v, m: jnp.sum(form(q, k, v, m).astype(jnp.float32) * g),
                            argnums=(0, 1, 2)))
    out = np.asarray(forward(q, k, v, mask).astype(jnp.float32))
    return (lambda: forward(q, k, v, mask).block_until_ready(),
            lambda: jax.block_until_ready(grad(q, k, v, mask)), out)


def torch_fns(q, k, v, dtype: str) -> tuple[Callable[[], object], Callable[[], object], np.ndarray]:
    """PyTorch's fused SDPA on `[b, h, s, d]` (kv heads repeated for GQA), forward and backward."""
    import torch

    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    groups = q.shape[2] // k.shape[2]
    tq, tk, tv = (torch.tensor(np.asarray(x)).to(tdtype).transpose(1, 2).contiguous()
                  for x in (q, k, v))
    g = torch.tensor(np.random.default_rng(3).standard_normal(q.shape)).to(tdtype).transpose(1, 2)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def forward():
        with torch.no_grad():
            return sdpa(tq, tk.repeat_interleave(groups, 1), tv.repeat_interleave(groups, 1),
                        is_causal=True)

    leaves = [x.clone().requires_grad_(True) for x in (tq, tk, tv)]

    def backward():
        a, b_, c = leaves
        out = sdpa(a, b_.repeat_interleave(groups, 1), c.repeat_interleave(groups, 1),
                   is_causal=True)
        return torch.autograd.grad((out * g).sum(), leaves)

    out = forward().transpose(1, 2).float().numpy()
    return forward, backward, out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=tuple(SHAPES), default="train")
    parser.add_argument("--block", type=int, default=128, help="query block of 'blocked' [128]")
    parser.add_argument("--bf16", action="store_true", help="also every form in bfloat16")
    parser.add_argument("--torch", action="store_true", help="also PyTorch's SDPA")
    harness.add_arguments(parser, repeats=10)
    args = parser.parse_args(argv)
    ctx = harness.start(args, __file__, argv)  # before JAX's first computation: pins threads
    if args.torch:
        harness.torch_threads(ctx.threads)
    b, s, h, kv, d = SHAPES[args.shape]
    rng = np.random.default_rng(0)
    q = rng.standard_normal((b, s, h, d), np.float32)
    k, v = (rng.standard_normal((b, s, kv, d), np.float32) for _ in range(2))
    mask = np.broadcast_to(np.tril(np.ones((s, s), bool)), (b, s, s))
    forms = {"einsum": einsum_form, "bhsd": bhsd_form, "dpa": dpa_form,
             "blocked": blocked_form(args.block), "slim_jax": library_form}
    dtypes = ("float32", "bfloat16") if args.bf16 else ("float32",)
    forward, backward, outputs = {}, {}, {}
    for dtype in dtypes:
        suffix = "" if dtype == "float32" else "-bf16"
        for name, form in forms.items():
            forward[name + suffix], backward[name + suffix], outputs[name + suffix] = jax_fns(
                form, q, k, v, mask, dtype)
        if args.torch:
            forward["torch" + suffix], backward["torch" + suffix], outputs["torch" + suffix] = (
                torch_fns(q, k, v, dtype))
    print(f"# shape {args.shape}: batch {b}, seq {s}, {h} heads / {kv} kv heads, head_dim {d}; "
          f"max |out - einsum f32|: " + ", ".join(
              f"{n} {np.abs(o - outputs['einsum']).max():.1e}" for n, o in outputs.items()))
    for label, fns in (("forward", forward), ("forward+backward", backward)):
        times = harness.interleave(fns, repeats=args.repeats)
        rows = [harness.compare(f"attention {label} s", times, name, "einsum")
                for name in fns if name != "einsum"]
        print(f"\n{label}: einsum (current form) {harness.describe(times['einsum'])}")
        print(ctx.table(rows))
        for row in rows:
            print(row.line())


if __name__ == "__main__":
    main()
