"""Throughput and utilisation estimates, and the metrics log (JSON lines).

MFU (model FLOPs utilisation) = model FLOPs per second / peak FLOPs of the devices. For adapter
training the model FLOPs per token are estimated from parameter counts (Kaplan et al.'s 2N per
forward multiply-add, applied to what is computed; `forward_flops_per_token`):

    forward 2 (N_frozen + N_trained) + backward to activations 2 (N_frozen + N_trained)
    + backward to the trained weights 2 N_trained   =   4 N_frozen + 6 N_trained

A forward-only program (LoRAHub's population scoring, generation) does the first term alone,
each parameter for the tokens its layer sees (`forward_flops`: in an encoder-decoder the
encoder's parameters see the encoder's tokens, the decoder's the decoder's). Attention-score FLOPs
are left out and the embedding table is counted as a matmul, so this is an estimate; pass
`flops_per_token` explicitly for an exact count.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx

from slim_jax.nn import module_path


def count_params(tree: Any) -> int:
    """Number of scalar entries in the arrays of `tree`.

    >>> import jax.numpy as jnp
    >>> count_params({"a": jnp.zeros((2, 3)), "b": jnp.zeros(4)})
    10
    """
    return sum(math.prod(getattr(x, "shape", ())) for x in jax.tree.leaves(tree))


def forward_flops_per_token(n_params: int) -> float:
    """Estimated model FLOPs per token of a forward pass through `n_params` parameters: `2 N`.

    >>> forward_flops_per_token(1000)
    2000.0
    """
    return 2.0 * n_params


def training_flops_per_token(n_frozen: int, n_trained: int) -> float:
    """Estimated model FLOPs per token of one adapter-training step: `4 N_frozen + 6 N_trained`
    (the forward pass and the backward pass to the activations through every parameter, the
    backward pass to the weights through the trained ones).

    >>> training_flops_per_token(1000, 10)
    4060.0
    """
    return 2 * forward_flops_per_token(n_frozen + n_trained) + forward_flops_per_token(n_trained)


def forward_flops(model: nnx.Module, tokens: Mapping[str, int]) -> float:
    """Estimated model FLOPs of one forward pass of `model` (a family, possibly abstract, with
    its adapters): `forward_flops_per_token` of each parameter (`nnx.Param`, adapters included)
    times the tokens its layer sees.

    Args:
      model: implements `mask_key` (`slim_jax.models.family.ModelFamily`): the batch key of the
        segment ids of the tokens each layer sees.
      tokens: token positions per segment-ids key (`{"segment_ids": n}` for a causal model;
        `enc_segment_ids` and `dec_segment_ids` for an encoder-decoder).

    Raises:
      KeyError: a layer sees tokens of a key `tokens` lacks.

    >>> from slim_jax.models.llama import Llama, LlamaConfig
    >>> cfg = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1,
    ...                   num_heads=2, num_kv_heads=1)
    >>> model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    >>> n = count_params(nnx.state(model, nnx.Param))
    >>> forward_flops(model, {"segment_ids": 10}) == 2 * n * 10
    True
    """
    return sum(forward_flops_per_token(math.prod(param.shape))
               * tokens[model.mask_key(module_path(path[:-1]))]
               for path, param in nnx.to_flat_state(nnx.state(model, nnx.Param)))


def mfu(
    tokens_per_second: float, flops_per_token: float, peak_flops_total: float | None
) -> float | None:
    """Model FLOPs utilisation in [0, 1] (None without a known peak).

    >>> mfu(1000.0, 1e9, 4e12)
    0.25
    """
    if not peak_flops_total:
        return None
    return tokens_per_second * flops_per_token / peak_flops_total


def batch_tokens(batch: dict[str, np.ndarray]) -> int:
    """Token positions in a batch (padding included): `tokens`, or encoder plus decoder tokens.

    >>> batch_tokens({"tokens": np.zeros((2, 8)), "targets": np.zeros((2, 8))})
    16
    """
    keys = [k for k in ("tokens", "enc_tokens", "dec_tokens") if k in batch]
    return int(sum(np.size(batch[k]) for k in keys))


class MetricsLog:
    """Append one JSON object per line to `path` (None: keep nothing on disk).

    Every record gets the wall-clock `time`. A local file is appended to and can be read (and
    plotted) while the run goes on; on object storage (`gs://...`), which cannot append, the
    whole file is rewritten at each write.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     log = MetricsLog(os.path.join(d, "metrics.jsonl"))
    ...     log.write({"step": 1, "loss": 2.5})
    ...     [r["loss"] for r in read_metrics(log.path)]
    [2.5]
    """

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = None if path is None else epath.Path(path)
        self._remote = self.path is not None and "://" in str(self.path)
        self._lines: list[str] = []
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self._remote and self.path.exists():
                self._lines = self.path.read_text().splitlines(keepends=True)

    def write(self, record: dict[str, Any]) -> None:
        """Append `record` (numbers, strings; numpy scalars are converted)."""
        if self.path is None:
            return
        clean = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in record.items()}
        clean.setdefault("time", time.time())
        line = json.dumps(clean) + "\n"
        if self._remote:
            self._lines.append(line)
            self.path.write_text("".join(self._lines))
        else:
            with self.path.open("a") as f:
                f.write(line)


    def truncate(self, step: int) -> int:
        """Drop the records of steps after `step` (a run resumed from the checkpoint of `step`
        redoes them); returns how many were dropped. The file is replaced atomically.

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     log = MetricsLog(os.path.join(d, "metrics.jsonl"))
        ...     for s in (1, 2, 3):
        ...         log.write({"step": s, "loss": 1.0})
        ...     log.truncate(2), [r["step"] for r in read_metrics(log.path)]
        (1, [1, 2])
        """
        if self.path is None or not self.path.exists():
            return 0
        lines = self.path.read_text().splitlines(keepends=True)
        kept = [ln for ln in lines if ln.strip() and _step_of(ln) <= step]
        dropped = sum(1 for ln in lines if ln.strip()) - len(kept)
        if dropped or len(kept) != len(lines):
            text = "".join(ln if ln.endswith("\n") else ln + "\n" for ln in kept)
            if self._remote:
                self._lines = [text] if text else []
                self.path.write_text(text)
            else:
                tmp = self.path.with_name(self.path.name + ".tmp")
                tmp.write_text(text)
                os.replace(tmp, self.path)
        return dropped


def _step_of(line: str) -> float:
    """The `step` of a metrics line; a line cut short by a kill counts as after every step."""
    try:
        return float(json.loads(line).get("step", math.inf))
    except (json.JSONDecodeError, AttributeError):
        return math.inf


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a metrics file, in order."""
    text = epath.Path(path).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]
