"""What a training run tells its user: metrics.jsonl, tracking sinks, a progress bar.

Only rank 0 writes. ``metrics.jsonl`` gets one JSON object per logged step (append mode, so
a resumed run continues the same file; each row carries ``step``); the sinks of
``train.report_to`` (TensorBoard by default, MLflow on request: ``ctprep_train.tracking``) get
the same numbers as scalars under ``train/`` and ``valid/``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ctprep_train.tracking import Sink, flatten, scalar


class RunLog:
    """Rank-0 sink for training metrics; a no-op on other ranks.

    Args:
        open_sinks: called once on rank 0 (after the run folder exists) to open the tracking
            sinks (``ctprep_train.tracking.open_sinks``); None = metrics.jsonl only.
    """

    def __init__(self, output: Path, *, enabled: bool, total_steps: int, start_step: int, progress_bar: bool,
                 open_sinks: Callable[[], Sequence[Sink]] | None = None) -> None:
        self.enabled = enabled
        self._jsonl = None
        self._sinks: list[Sink] = []
        self._bar = None
        if not enabled:
            return
        output.mkdir(parents=True, exist_ok=True)
        self._jsonl = (output / "metrics.jsonl").open("a", buffering=1)
        self._sinks = list(open_sinks()) if open_sinks is not None else []
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        """One row: ``kind`` is "train" or "valid"; nested dicts are flattened with '/'."""
        if not self.enabled:
            return
        row = {"step": step, "kind": kind, "time": round(time.time(), 3), **values}
        self._jsonl.write(json.dumps(row, default=float) + "\n")
        numbers = {k: n for k, n in ((k, scalar(v)) for k, v in flatten(values).items()) if n is not None}
        for sink in self._sinks:
            sink.log_scalars(kind, step, numbers)

    def progress(self, step: int, postfix: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in postfix.items()}, refresh=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        for sink in self._sinks:
            sink.close()
        if self._jsonl is not None:
            self._jsonl.close()

