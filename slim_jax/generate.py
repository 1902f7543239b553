"""`python -m slim_jax.generate`: continue a prompt with a model (and adapter); print the text.

MODEL is a Hugging Face model directory or hub id (Llama family, T5 / FLAN-T5), or a llama2.c
checkpoint file (its `tokenizer.bin` beside it unless `--tokenizer` names another). A relative
path that does not exist as given is looked up in the data folder (`--data-dir` or
`$SLIM_JAX_DATA_DIR`), so `tinystories260k/checkpoint_v1.bin` works from anywhere. `--adapter` is
a PEFT adapter directory (or its hub id) or a slim_jax checkpoint (a training run's `checkpoints/`
folder, one of its step folders, or the run folder). An empty prompt starts from BOS (T5: from an
empty input). Decoding is greedy unless `--temperature` is above 0 (then `--top-p` and `--seed`
apply).

Only the generated text goes to stdout; warnings go to stderr. Bad input (a missing path, a hub
id that cannot be fetched offline, an adapter that does not fit) prints one line on stderr saying
what to fix and exits with status 2.

Examples:
    python -m slim_jax.generate tinystories260k/checkpoint_v1.bin --max-new-tokens 200
    python -m slim_jax.generate google/flan-t5-large --prompt "Translate to German: Hello"
    python -m slim_jax.generate google/flan-t5-large --adapter lorahub/flan_t5_large-wiqa \\
        --prompt "Process: ... Question: ..."
    python -m slim_jax.generate /models/llama --adapter runs/lora/seed0/peft --prompt "Q: 2+2?"
    python -m slim_jax.generate /models/llama --adapter runs/slim/seed0/checkpoints \\
        --temperature 0.8 --top-p 0.95 --seed 3 --dtype bfloat16
"""

from __future__ import annotations

# jax, flax and the models are imported inside `run`, so --help and usage errors answer at once.
import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from flax import nnx

PROG = "python -m slim_jax.generate"
DTYPES = ("float32", "bfloat16")


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (exit status 2), like every other bad input."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m slim_jax.generate` (see the module docstring).

    >>> args = build_parser().parse_args(["model_dir", "--temperature", "0.7"])
    >>> args.model, args.prompt, args.temperature, args.max_new_tokens
    ('model_dir', '', 0.7, 64)
    """
    parser = _OneLineParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate text with a slim_jax model and an optional adapter; prints only "
        "the generated text.",
        epilog=__doc__[__doc__.index("Examples:"):] if __doc__ else None)  # None under -OO
    parser.add_argument("model", metavar="MODEL", help="Hugging Face model directory or hub id, "
                        "or a llama2.c checkpoint file (.bin)")
    parser.add_argument("--tokenizer", metavar="PATH", help="tokenizer to use instead of the "
                        "model's (llama2.c: default tokenizer.bin beside the checkpoint)")
    parser.add_argument("--adapter", metavar="PATH", help="PEFT adapter directory (or its hub "
                        "id) or slim_jax checkpoint directory")
    parser.add_argument("--prompt", default="", metavar="TEXT",
                        help="text to continue (default: empty, start from BOS)")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                        help="most tokens to generate (default: 64)")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T",
                        help="0 for greedy decoding (default), else the sampling temperature")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P",
                        help="nucleus sampling threshold in (0, 1] (default: 1, no cut)")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="PRNG seed for sampling (default: 0)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="compute and weight dtype (default: float32)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="accept PyTorch pickle weights (.bin/.pt): they can run code, so "
                        "only for checkpoints you trust")
    parser.add_argument("--data-dir", metavar="DIR", help="data folder where relative paths are "
                        "also looked up (default: $SLIM_JAX_DATA_DIR)")
    return parser


def run(args: argparse.Namespace) -> str:
    """Load, attach, generate: the text `main` prints for parsed `args`.

    Raises:
      SlimJaxError: bad input (see `main`).
    """
    import jax
    import jax.numpy as jnp

    from slim_jax.models.generate import generate
    from slim_jax.models.loading import load_model
    from slim_jax.nn import inference_view
    from slim_jax.settings import locate

    find = lambda path: None if path is None else locate(path, args.data_dir)
    model_path = find(args.model)
    # The jnp scalar types, as the library's defaults are: equal configs share compiled programs.
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    model, tokenizer = load_model(model_path, tokenizer=find(args.tokenizer),
                                  dtype=dtype, param_dtype=dtype, allow_pickle=args.allow_pickle)
    if args.adapter is not None:
        _attach(model, find(args.adapter), args)
    # Inference mode: dropout off, SLIM cluster statistics frozen, dynamic merging on.
    model = inference_view(model)
    generation = generate(
        model, [args.prompt], tokenizer=tokenizer, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, key=jax.random.key(args.seed))
    return generation.texts[0]


def _attach(model: nnx.Module, adapter: str, args: argparse.Namespace) -> None:
    """Attach the adapter; a PEFT adapter recorded for another base model is worth a warning
    when it loads, and a hint in the error when it does not."""
    from slim_jax.errors import SlimJaxError
    from slim_jax.models.adapter_io import attach_adapter, find_adapter
    from slim_jax.models.peft_io import read_peft_config, same_base_model

    source = find_adapter(adapter, allow_pickle=args.allow_pickle)
    recorded = (read_peft_config(source.directory).base_model_name_or_path
                if source.format == "peft" else None)
    other_base = bool(recorded) and not same_base_model(recorded, args.model)
    try:
        attach_adapter(model, source, allow_pickle=args.allow_pickle)
    except SlimJaxError as err:
        if other_base:
            raise type(err)(f"{err} (the adapter was trained on {recorded!r}, not "
                            f"{args.model!r})") from err
        raise
    if other_base:
        print(f"{PROG}: warning: the adapter {adapter} was trained on {recorded!r}, not "
              f"{args.model!r}; its output may be meaningless on another base model",
              file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line `argv` (default `sys.argv[1:]`); returns the exit status.

    0: the text was printed. 2: bad input; one line on stderr says what to fix (no traceback).

    >>> main(["/no/such/model"])  # stderr: ... error: no directory '/no/such/model': ...
    2
    """
    from slim_jax.errors import SlimJaxError

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2, already reported)
        return int(exit_.code or 0)
    try:
        text = run(args)
    except (SlimJaxError, OSError) as err:
        print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
