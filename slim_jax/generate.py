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
id that cannot be fetched offline, an adapter that does not fit, NaN or infinite weights, a
`--max-new-tokens` whose KV cache cannot fit in memory) prints one line on stderr saying what to
fix, naming the flag, and exits with status 2. A prompt plus `--max-new-tokens` longer than the
model's positions is refused, except for RoPE models, which extrapolate (with a warning).

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
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from flax import nnx

PROG = "python -m slim_jax.generate"
DTYPES = ("float32", "bfloat16")
FLAGS = {"allow_pickle=True": "--allow-pickle", "max_new_tokens": "--max-new-tokens",
         "top_p": "--top-p", "temperature": "--temperature"}
"""Library argument names in error messages, and the flags the user sets them with."""


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

    from slim_jax.errors import ConfigError
    from slim_jax.models.generate import generate
    from slim_jax.models.loading import load_model
    from slim_jax.nn import inference_view
    from slim_jax.settings import locate

    check_args(args)
    find = lambda path: None if path is None else locate(path, args.data_dir)
    model_path = find(args.model)
    # The jnp scalar types, as the library's defaults are: equal configs share compiled programs.
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    model, tokenizer = load_model(model_path, tokenizer=find(args.tokenizer),
                                  dtype=dtype, param_dtype=dtype, allow_pickle=args.allow_pickle)
    if args.adapter is not None:
        _attach(model, find(args.adapter), model_path, args)
    prompt_tokens = len(tokenizer.encode(args.prompt)) + 1  # and BOS (or T5's EOS)
    check_cache_fits(model, prompt_tokens, args.max_new_tokens)
    check_positions(model, prompt_tokens, args.max_new_tokens)
    # Inference mode: dropout off, SLIM cluster statistics frozen, dynamic merging on.
    model = inference_view(model)
    try:
        generation = generate(
            model, [args.prompt], tokenizer=tokenizer, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_p=args.top_p, key=jax.random.key(args.seed))
    except jax.errors.JaxRuntimeError as err:  # the safety net under check_cache_fits
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        raise ConfigError(f"out of device memory generating {args.max_new_tokens} tokens: lower "
                          f"--max-new-tokens ({str(err).splitlines()[0][:200]})") from err
    return generation.texts[0]


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad numbers before anything is loaded, naming the flag.

    >>> check_args(build_parser().parse_args(["m", "--top-p", "0"]))
    Traceback (most recent call last):
    ...
    slim_jax.errors.ConfigError: --top-p must be in (0, 1], got 0.0
    """
    from slim_jax.errors import ConfigError

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ConfigError(f"--temperature must be >= 0 (0: greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p}")


def check_positions(model: Any, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse a generation longer than the model's positions (`max_position_embeddings`), unless
    its positions are rotary (`rope_theta`): RoPE extrapolates, often badly, so then warn.

    Raises:
      ConfigError: prompt plus `--max-new-tokens` beyond the positions of a non-RoPE model.
    """
    from slim_jax.errors import ConfigError

    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    total = prompt_tokens + max_new_tokens
    if limit is None or total <= limit:
        return
    what = (f"the prompt ({prompt_tokens} tokens) plus --max-new-tokens {max_new_tokens} = "
            f"{total} positions exceed the model's {limit} (max_position_embeddings)")
    if getattr(config, "rope_theta", None) is None:
        raise ConfigError(f"{what}; lower --max-new-tokens to {max(limit - prompt_tokens, 0)} "
                          "or shorten the prompt")
    print(f"{PROG}: warning: {what}; its rotary positions extrapolate, but text beyond "
          f"{limit} tokens is usually poor", file=sys.stderr)


def decode_state_bytes(model: Any, prompt_tokens: int, max_new_tokens: int) -> int:
    """Bytes of the decoding state `model.prefill` builds for one prompt of `prompt_tokens`
    tokens (padded to its bucket, as `generate` does) and `max_new_tokens` new ones: the KV
    cache, and for an encoder-decoder also the encoder's cross-attention keys and values. From
    shapes only (`jax.eval_shape` of the family's `prefill`: nothing is computed or allocated),
    so every family is measured the same way.

    >>> from flax import nnx
    >>> from slim_jax.models.llama import Llama, LlamaConfig
    >>> cfg = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=2,
    ...                   num_heads=2, num_kv_heads=1)
    >>> decode_state_bytes(Llama(cfg, rngs=nnx.Rngs(0)), 1, 10**9) // 10**9  # per position
    68

    (keys and values of 2 layers, 1 head of 4 float32 each: 64 bytes, and an int32 segment id.)
    """
    import jax
    import jax.numpy as jnp

    from slim_jax.models.functional import call_split, split_model
    from slim_jax.models.generate import bucket_length

    graphdef, params, rest = split_model(model)
    tokens = jax.ShapeDtypeStruct((1, bucket_length(prompt_tokens, minimum=16)), jnp.int32)

    def state(params: Any, rest: Any, tokens: jax.Array) -> Any:
        (_, decode_state), _ = call_split(
            graphdef, params, rest, lambda m: m.prefill(tokens, tokens, max_new_tokens))
        return decode_state

    shapes = jax.eval_shape(state, params, rest, tokens)
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))


def memory_bytes() -> int:
    """Memory of the first device (its allocator limit), or of the host for a CPU."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_cache_fits(model: Any, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse a generation whose KV cache (prompt bucket + new tokens) and weights cannot fit in
    memory, naming the size it needs.

    Raises:
      ConfigError: the cache would not fit; the message names `--max-new-tokens`.
    """
    import jax
    from flax import nnx

    from slim_jax.errors import ConfigError
    from slim_jax.models.generate import bucket_length

    bucket = bucket_length(prompt_tokens, minimum=16)
    cache = decode_state_bytes(model, prompt_tokens, max_new_tokens)
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model)))
    have = memory_bytes()
    if cache + weights > have:
        raise ConfigError(
            f"--max-new-tokens {max_new_tokens} needs a KV cache of {_size(cache)} (a "
            f"{bucket}-position prompt and {max_new_tokens} new tokens) besides "
            f"{_size(weights)} of weights, more than the {_size(have)} of "
            f"memory of this {jax.devices()[0].platform.upper()}: lower --max-new-tokens")


def _size(n: float) -> str:
    """A byte count for people: `_size(2.4e12)` is '2.4 TB'."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    raise AssertionError("unreachable")


def same_model_path(recorded: str, given: str, model_path: str,
                    data_dir: str | os.PathLike[str] | None) -> bool:
    """Whether the base model an adapter records is the one loaded: the same name
    (`peft_io.same_base_model`), or both resolve to the same file or folder, or one is the
    llama2.c checkpoint file inside the other (`tinystories260k` ~ `tinystories260k/ckpt.bin`,
    what slim_finetune records for its own adapters).

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> (d / "m.bin").write_bytes(b"")
    0
    >>> same_model_path(str(d), "m.bin", str(d / "m.bin"), None)
    True
    >>> same_model_path("org/other", "m.bin", str(d / "m.bin"), None)
    False
    """
    from slim_jax.models.peft_io import same_base_model
    from slim_jax.settings import locate

    if same_base_model(recorded, given):
        return True
    try:
        theirs = Path(locate(recorded, data_dir)).expanduser()
    except OSError:
        return False
    mine = Path(model_path).expanduser()
    if not (theirs.exists() and mine.exists()):
        return False
    theirs, mine = theirs.resolve(), mine.resolve()
    return (theirs == mine or (mine.is_file() and mine.parent == theirs)
            or (theirs.is_file() and theirs.parent == mine))


def _attach(model: nnx.Module, adapter: str, model_path: str, args: argparse.Namespace) -> None:
    """Attach the adapter; a PEFT adapter recorded for another base model is worth a warning
    when it loads, and a hint in the error when it does not."""
    from slim_jax.errors import SlimJaxError
    from slim_jax.models.adapter_io import attach_adapter, find_adapter
    from slim_jax.models.peft_io import read_peft_config

    source = find_adapter(adapter, allow_pickle=args.allow_pickle)
    recorded = (read_peft_config(source.directory).base_model_name_or_path
                if source.format == "peft" else None)
    other_base = bool(recorded) and not same_model_path(recorded, args.model, model_path,
                                                        args.data_dir)
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
    from slim_jax.errors import SlimJaxError, with_flags

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2, already reported)
        return int(exit_.code or 0)
    try:
        text = run(args)
    except (SlimJaxError, OSError) as err:
        print(f"{PROG}: error: {with_flags(' '.join(str(err).split()), FLAGS)}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
