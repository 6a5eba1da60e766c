"""What a training run tells its user: metrics.jsonl, TensorBoard scalars, a progress bar.

Only rank 0 writes. ``metrics.jsonl`` gets one JSON object per logged step (append mode, so
a resumed run continues the same file; each row carries ``step``), TensorBoard gets the same
numbers as scalars under ``train/`` and ``valid/``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


def _scalar(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


class RunLog:
    """Rank-0 sink for training metrics; a no-op on other ranks."""

    def __init__(self, output: Path, *, enabled: bool, total_steps: int, start_step: int, progress_bar: bool) -> None:
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        output.mkdir(parents=True, exist_ok=True)
        self._jsonl = (output / "metrics.jsonl").open("a", buffering=1)
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(log_dir=str(output / "tensorboard"), purge_step=start_step + 1)
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        """One row: ``kind`` is "train" or "valid"; nested dicts are flattened with '/'."""
        if not self.enabled:
            return
        row = {"step": step, "kind": kind, "time": round(time.time(), 3), **values}
        self._jsonl.write(json.dumps(row, default=float) + "\n")
        for key, value in _flatten(values).items():
            number = _scalar(value)
            if number is not None:
                self._tb.add_scalar(f"{kind}/{key}", number, step)

    def progress(self, step: int, postfix: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in postfix.items()}, refresh=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}/"))
        else:
            out[name] = value
    return out
