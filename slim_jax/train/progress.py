"""The live progress bar: step, loss, tokens/s and MFU (process 0 only)."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


class Progress:
    """A tqdm bar over the run's steps; a no-op when `enabled` is False.

    >>> bar = Progress(total=10, initial=0, enabled=False)
    >>> bar.update(1, loss=2.0, tokens_per_s=100.0, mfu=None); bar.close()
    """

    def __init__(self, total: int, initial: int = 0, *, enabled: bool = True) -> None:
        self._bar = (
            tqdm(total=total, initial=initial, desc="train", unit="step", file=sys.stderr,
                 dynamic_ncols=True)
            if enabled
            else None
        )
        self._step = initial

    def update(
        self, step: int, *, loss: float, tokens_per_s: float | None, mfu: float | None
    ) -> None:
        """Move the bar to `step` and show the latest figures."""
        if self._bar is None:
            return
        post = {"loss": f"{loss:.4f}"}
        if tokens_per_s is not None:
            post["tok/s"] = f"{tokens_per_s:,.0f}"
        if mfu is not None:
            post["MFU"] = f"{100 * mfu:.1f}%"
        self._bar.set_postfix(post, refresh=False)
        self._bar.update(step - self._step)
        self._step = step

    def close(self) -> None:
        """Finish the bar."""
        if self._bar is not None:
            self._bar.close()
