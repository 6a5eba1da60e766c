"""An exponential moving average of the model weights (``train.ema_decay``), off by default.

After every optimizer step the average moves towards the live weights::

    ema <- d * ema + (1 - d) * weights,    d = min(ema_decay, (1 + n) / (10 + n))

where ``n`` counts the updates so far; the warm-up term is timm's (``ModelEmaV2``/``V3``): the
first updates follow the weights closely instead of remembering the random init for thousands of
steps. Floating-point weights and buffers are averaged in fp32 whatever the training dtype; integer
buffers (BatchNorm's ``num_batches_tracked``) are copied.

When it is on, validation runs with the averaged weights, the ``encoder/`` export of every
checkpoint holds them (``training.json`` says ``"weights": "ema"``), and the checkpoint keeps the
average in ``ema.safetensors`` beside DeepSpeed's files so that ``--resume`` continues it; training
itself always steps the live weights. Every rank keeps the average of the full model, which needs
the full weights on every rank: ZeRO stages 0-2 (stage 3 partitions them and is refused).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

EMA_FILE = "ema.safetensors"
WARMUP = 10  # d = min(decay, (1 + n) / (WARMUP + n))


def decay_at(decay: float, updates: int) -> float:
    """The averaging weight of the old average at update number ``updates`` (1-based)."""
    return min(decay, (1.0 + updates) / (WARMUP + updates))


class WeightEma:
    """The running average of ``module``'s state dict, kept on the module's device in fp32."""

    def __init__(self, module: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.updates = 0
        self.shadow = {k: _as_avg(v).clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        """One averaging step towards ``module``'s current weights."""
        self.updates += 1
        d = decay_at(self.decay, self.updates)
        state = module.state_dict()
        if state.keys() != self.shadow.keys():
            missing = sorted(set(state) ^ set(self.shadow))[:5]
            raise RuntimeError(f"weight average: the model's parameters changed (e.g. {missing})")
        floats = [k for k, v in state.items() if v.is_floating_point()]
        if floats:
            torch._foreach_lerp_([self.shadow[k] for k in floats], [_as_avg(state[k]) for k in floats], 1.0 - d)
        for k, v in state.items():
            if not v.is_floating_point():
                self.shadow[k].copy_(v)

    def state_for_export(self) -> dict[str, torch.Tensor]:
        """The averaged weights as fp32 CPU tensors, keyed like the model's state dict."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.shadow.items()}

    @contextmanager
    def applied(self, module: torch.nn.Module) -> Iterator[None]:
        """Run the body with the averaged weights in ``module``; the live weights come back after."""
        state = module.state_dict()
        live = {k: v.detach().clone() for k, v in state.items()}
        with torch.no_grad():
            for k, v in state.items():
                v.copy_(self.shadow[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, v in state.items():
                    v.copy_(live[k])

    def save(self, folder: Path) -> Path:
        """Write ``folder/ema.safetensors`` (the average and its update count)."""
        from safetensors.torch import save_file

        from ctprep.atomic import atomic_path

        target = Path(folder) / EMA_FILE
        with atomic_path(target) as tmp:
            save_file(self.state_for_export(), str(tmp),
                      metadata={"updates": str(self.updates), "decay": repr(self.decay)})
        return target

    def load(self, folder: Path) -> bool:
        """Restore the average from ``folder/ema.safetensors``; False when the file is not there."""
        from safetensors import safe_open

        path = Path(folder) / EMA_FILE
        if not path.is_file():
            return False
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as exc:  # truncated or not a safetensors file
            raise RuntimeError(f"{path}: not a readable weight average ({type(exc).__name__}: {exc})") from exc
        with handle as f:
            keys = set(f.keys())
            if keys != self.shadow.keys():
                diff = sorted(keys ^ set(self.shadow))[:5]
                raise RuntimeError(f"{path}: the weight average does not match the model (e.g. {diff})")
            for k in keys:
                self.shadow[k].copy_(f.get_tensor(k).reshape(self.shadow[k].shape))
            self.updates = int(f.metadata().get("updates", "0"))
        return True


def _as_avg(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float() if t.is_floating_point() else t.detach()
