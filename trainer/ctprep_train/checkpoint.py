"""Crash-safe checkpoints: DeepSpeed state + a plain ``encoder/`` export + a completion marker.

Layout under the run folder::

    checkpoints/step_00000040/          DeepSpeed save_checkpoint(tag="step_00000040")
        mp_rank_00_model_states.pt ...  (engine, optimizer, scheduler, client state)
        encoder/                        self-contained export (ctprep_train.export): fp32 weights, config,
                                        preprocessing.json, tokenizer files, model card
        ema.safetensors                 the weight average, when train.ema_decay > 0 (the export holds it)
        COMPLETE                        JSON {"step", ...}; written LAST, atomically
    encoder/                            copy of the newest export (what evaluation loads)

A checkpoint without ``COMPLETE`` is half-written (the run died while saving) and is
ignored by ``--resume auto`` (alias ``latest``, open_clip's spelling); it is deleted once a
newer complete one exists.
The encoder export holds the fp32 master weights reconstructed from the ZeRO shards just
written (``deepspeed.utils.zero_to_fp32``), so it equals what a resumed run trains on.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ctprep.atomic import atomic_path, atomic_write_json
from ctprep_train.ema import WeightEma

COMPLETE_MARKER = "COMPLETE"
CHECKPOINT_DIR = "checkpoints"
NEWEST_ALIASES = ("auto", "latest")  # --resume spellings for "the newest complete checkpoint"
TAG_RE = re.compile(r"^step_(\d{8})$")


def checkpoint_tag(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(output: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint of a run, oldest first."""
    root = Path(output) / CHECKPOINT_DIR
    found = []
    if root.is_dir():
        for path in root.iterdir():
            match = TAG_RE.match(path.name)
            if match and (path / COMPLETE_MARKER).is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume(output: Path, resume: str | None) -> Path | None:
    """The checkpoint folder to resume from, or None to start fresh.

    ``auto`` or ``latest``: the newest complete checkpoint of ``output`` (None if there is none);
    a path: that checkpoint folder, which must be complete.
    """
    if not resume:
        return None
    if resume in NEWEST_ALIASES:
        done = complete_checkpoints(output)
        return done[-1][1] if done else None
    path = Path(resume)
    if not (path / COMPLETE_MARKER).is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no {COMPLETE_MARKER} marker)")
    return path


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def export_encoder(
    ckpt_dir: Path,
    build_fresh_model: Callable[[], torch.nn.Module],
    save_pretrained: Callable[[torch.nn.Module, str], Any],
    tokenizer: dict[str, str],
    metadata: dict[str, Any] | None = None,
    step: int | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Rank 0: rebuild fp32 weights from the ZeRO checkpoint in ``ckpt_dir`` into ``ckpt_dir/encoder``.

    ``metadata`` (``ctprep_train.export.export_metadata``: preprocessing spec + data summary) and
    ``step`` make the export self-contained (``ctprep_train.export.complete_export``). ``weights``:
    export these instead (the weight average of ``train.ema_decay``; ``training.json`` says so).
    """
    from ctprep_train.export import complete_export

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if weights is None:
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)
    else:
        state = dict(weights)
        metadata = {**(metadata or {}), "weights": "ema"}
    model = build_fresh_model()
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    # Scalars were trained as (1,) tensors (train.promote_scalar_params): restore their shape.
    state = {k: v.reshape(shapes[k]) if k in shapes and v.numel() == shapes[k].numel() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    target = ckpt_dir / "encoder"
    with atomic_path(target) as tmp:
        save_pretrained(model, str(tmp))
        complete_export(tmp, dict(tokenizer), metadata=metadata, step=step, run=Path(ckpt_dir).parent.parent.name)
    return target


def publish_encoder(output: Path, ckpt_dir: Path) -> Path:
    """Rank 0: make ``output/encoder`` a copy of ``ckpt_dir/encoder`` (swap via a temporary name)."""
    target = Path(output) / "encoder"
    for debris in Path(output).glob("encoder.tmp-*"):  # a run killed while publishing
        shutil.rmtree(debris, ignore_errors=True)
    with atomic_path(target) as tmp:
        shutil.copytree(ckpt_dir / "encoder", tmp)
    return target


def save_checkpoint(
    engine,
    output: Path,
    step: int,
    client_state: dict[str, Any],
    *,
    rank: int,
    keep: int,
    build_fresh_model: Callable[[], torch.nn.Module],
    save_pretrained: Callable[[torch.nn.Module, str], Any],
    tokenizer: dict[str, str],
    export_metadata: dict[str, Any] | None = None,
    ema: WeightEma | None = None,
) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder.

    ``export_metadata``: see :func:`export_encoder` (rank 0's value is used). ``ema``: the weight
    average (``train.ema_decay``): saved as ``ema.safetensors`` and exported instead of the weights."""
    root = Path(output) / CHECKPOINT_DIR
    tag = checkpoint_tag(step)
    ckpt_dir = root / tag
    if rank == 0 and ckpt_dir.exists():  # a half-written save of the same step from a dead run
        shutil.rmtree(ckpt_dir)
    _barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state)
    _barrier()  # all ZeRO shards on disk before rank 0 reads them back
    if rank == 0:
        if ema is not None:
            ema.save(ckpt_dir)
        export_encoder(ckpt_dir, build_fresh_model, save_pretrained, tokenizer, export_metadata, step,
                       weights=ema.state_for_export() if ema is not None else None)
        atomic_write_json(ckpt_dir / COMPLETE_MARKER, {"step": step, **client_state}, indent=1)
        publish_encoder(output, ckpt_dir)
        prune_checkpoints(output, keep)
    _barrier()
    return ckpt_dir


def prune_checkpoints(output: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; drop older ones and stale half-written ones."""
    done = complete_checkpoints(output)
    if not done:
        return
    newest = done[-1][0]
    for step, path in done[: max(0, len(done) - max(1, keep))]:
        shutil.rmtree(path, ignore_errors=True)
    for path in (Path(output) / CHECKPOINT_DIR).iterdir():
        match = TAG_RE.match(path.name)
        if match and not (path / COMPLETE_MARKER).is_file() and int(match.group(1)) < newest:
            shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(engine, ckpt_dir: Path) -> dict[str, Any]:
    """Collective: restore engine, optimizer, scheduler; return the client state."""
    _, client_state = engine.load_checkpoint(
        str(ckpt_dir.parent), tag=ckpt_dir.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if client_state is None:
        raise RuntimeError(f"{ckpt_dir}: DeepSpeed could not load the checkpoint")
    return client_state
