"""Compile time against depth, unrolled against scanned layers; peak activation memory with and
without rematerialisation. On this host's CPU by default (`--topology v5e-4` for a TPU chip).

    nice python benchmarks/compile_depth.py                        # depths 8 16 32, narrow width
    nice python benchmarks/compile_depth.py --depths 8 16 --topology v5e-4
    nice python benchmarks/compile_depth.py --layouts scanned --depths 8 32

Each row compiles the real LoRA training step (`slim_jax.train.aot.compile_train_step`) of a
narrow Llama (width 256) of the given depth, once per setting of the model config's `scan_layers`
and `remat` fields; a setting the config does not have yet is reported as such and not compiled.
Temporaries are `memory_analysis().temp_size_in_bytes`: the activations the backward pass keeps
plus scratch, what remat trades for recomputation. Compile times depend on the host and its load.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from flax import nnx

from slim_jax.models.llama import LlamaConfig
from slim_jax.nn import LoRAConfig, inject
from slim_jax.parallel import MeshConfig
from slim_jax.parallel.topology import topology
from slim_jax.train import TrainConfig
from slim_jax.train.aot import architecture, compile_train_step, model_factory

NARROW = dict(architecture("llama-3-8b"), vocab_size=1024, hidden_size=256, intermediate_size=512,
              num_attention_heads=4, num_key_value_heads=2)
FIELDS = {f.name for f in dataclasses.fields(LlamaConfig)}


def settings(remat_policies: list[str], layouts: list[str]) -> list[dict[str, object]]:
    """(scan, remat) combinations to compile: each layout (unrolled/scanned) x remat policy."""
    return [{"scan_layers": layout == "scanned", "remat": remat}
            for layout in layouts for remat in remat_policies]


def row(depth: int, setting: dict[str, object], args: argparse.Namespace) -> str:
    missing = [k for k, v in setting.items() if k not in FIELDS and v not in (False, "none")]
    layout = "scanned" if setting["scan_layers"] else "unrolled"
    label = f"| {depth} | {layout} | {setting['remat']} |"
    if missing:
        return f"{label} - | - | LlamaConfig has no `{'`, `'.join(missing)}` field yet |"
    overrides = {k: v for k, v in setting.items() if k in FIELDS}
    factory = model_factory(dict(NARROW, num_hidden_layers=depth), overrides=overrides)

    def adapted():
        model = factory()
        inject(model, r"(q|v)_proj$", LoRAConfig(rank=8), rngs=nnx.Rngs(0))
        return model

    config = TrainConfig(steps=10, frozen_dtype="bfloat16", mesh=MeshConfig(data=1, fsdp=-1))
    r = compile_train_step(nnx.eval_shape(adapted), topology(args.topology), config,
                           batch_size=args.batch_size, seq_len=args.seq_len)
    return f"{label} {r.compile_s:.1f} | {r.temp_bytes / 2**20:.1f} | |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--remat", nargs="+", default=["none", "full"],
                        help="values of LlamaConfig.remat to compare ('none': off)")
    parser.add_argument("--layouts", nargs="+", default=["unrolled", "scanned"],
                        choices=["unrolled", "scanned"], help="LlamaConfig.scan_layers off / on")
    parser.add_argument("--topology", default="cpu-1")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args(argv)
    print(f"LoRA train step, Llama width 256, batch {args.batch_size} x {args.seq_len}, "
          f"on {args.topology}")
    print("| layers | layers as | remat | compile s | temporaries MiB | note |")
    print("|---|---|---|---|---|---|")
    for depth in args.depths:
        for setting in settings(args.remat, args.layouts):
            print(row(depth, setting, args), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
