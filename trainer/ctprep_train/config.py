"""Typed training configuration: one YAML composes model, data, loss, optimizer and DeepSpeed.

A config file has five sections (``model``, ``data``, ``loss``, ``optim``, ``train``), each
loaded into its own dataclass so that every part of the trainer receives only the slice it
needs. Unknown keys fail loudly with the valid choices (MONAI ``look_up_option`` style), and
command-line overrides use dotted keys (``optim.lr=1e-4``, ``data.sources.ctrate=2``) whose
values are parsed as YAML scalars. A file may start from another with ``extends: <path>``
(relative to the file). Reading and typing is ``ctprep.typed_config``'s, shared with the
pipeline's and the model's configs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctprep.schema import SCHEMA_VERSION
from ctprep.typed_config import ConfigError, apply_override, from_dict, look_up_option, read_yaml_chain
from ctprep_train.tracking import REPORT_TO

__all__ = ["Config", "ConfigError", "apply_override", "load_config", "load_deepspeed_config", "read_config_tree"]


@dataclass
class ModelConfig:
    name: str = "tiny"  # a file in configs/model/ (ctprep_train.model.list_models()) or a path
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted keys passed to create_model
    # Module providing create_model(name, **overrides) and save_pretrained(model, dir);
    # tests plug in a stand-in module here.
    module: str = "ctprep_train.model"


@dataclass
class DataConfig:
    shards: str = "shards"  # folder holding index.json (relative to the working directory)
    train_split: str = "train"
    valid_split: str = "valid"
    # source name -> sampling weight; a source missing from the shards is an error, weight 0 drops it.
    sources: dict[str, float] = field(default_factory=lambda: {"ctrate": 1.0})
    batch_size: int = 2  # samples per rank per micro-step (DeepSpeed train_micro_batch_size_per_gpu)
    buffer_size: int = 8  # shuffle buffer, in samples; holds only tar offsets, decode is lazy
    num_workers: int = 1  # DataLoader worker processes per rank
    prefetch_factor: int = 2  # batches prefetched per worker
    # Threads per rank copying volume bytes from the shard files into batch tensors (preadv
    # releases the GIL, so two threads keep up with memory bandwidth where one cannot).
    read_threads: int = 2
    seed: int = 0  # one seed on every rank: shard order, buffer, source choice
    pin_memory: bool = True  # used only when a CUDA device is present
    # refuse shards of another schema version (default: the installed ctprep.schema.SCHEMA_VERSION)
    schema_version: int = SCHEMA_VERSION
    # Tokenizer identity the shards must carry: "model" = the model's text tower tokenizer
    # (ctprep.tokenizer.tokenizer_identity of model text.path), "index" = whatever index.json says
    # (only checks that all shards agree), or an explicit {"name": ..., "hash": ...}.
    tokenizer: Any = "model"
    patch_size: list[int] = field(default_factory=lambda: [4, 16, 16])  # (z, y, x) voxels
    valid_max_samples: int = 256  # cap on validation samples (0 = all)
    # Probability, per training sample, that its anatomy mask is replaced by all background (the
    # case then looks like one packed with has_mask: false: region anchors dropped), so that a
    # scan without a mask is in distribution at inference (ctprep_train.data.mask_dropout).
    mask_dropout: float = 0.0


@dataclass
class AugmentConfig:
    """ctprep_train.augment: per-sample in-plane zoom, shifts and HU jitter on the device; no flips (reports name sides)."""

    enabled: bool = False
    shift_voxels: list[int] = field(default_factory=lambda: [0, 0, 0])  # max |shift| (z, y, x), voxels
    zoom: float = 0.0  # in-plane scale jitter: y and x each x U(1 - zoom, 1 + zoom), in [0, 0.5)
    hu_scale: float = 0.0  # relative contrast jitter: hu * (1 + U(-s, s))
    hu_offset: float = 0.0  # level jitter: + U(-o, o) HU
    noise_hu: float = 0.0  # Gaussian noise std, HU
    pad_hu: float = -1024.0  # shifted-in voxels (air)


@dataclass
class LossConfig:
    # "module:callable" building the loss from the options below.
    factory: str = "ctprep_train.losses:MultiTaskLoss"
    weights: dict[str, float] = field(default_factory=dict)  # term name -> weight
    options: dict[str, Any] = field(default_factory=dict)  # extra keyword options of the loss
    # Upper bound of every exp'd logit scale (CLIP's 100 = temperature 0.01), applied to the
    # model outputs before the loss; the fp32 master weights live in the DeepSpeed optimizer,
    # so clamping at use is the one place that works for ZeRO 2 and 3 alike.
    max_logit_scale: float = 100.0


@dataclass
class OptimConfig:
    lr: float = 3e-4  # peak learning rate after warmup
    weight_decay: float = 0.05  # AdamW decoupled decay; biases, norms and logit scales get 0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    warmup_steps: int = 10  # optimizer steps of linear warmup from 0
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr


@dataclass
class TrainConfig:
    steps: int = 100  # total optimizer steps (after gradient accumulation)
    deepspeed: str = "configs/deepspeed/zero2.json"  # DeepSpeed JSON (zero stage, bf16, clipping)
    deepspeed_overrides: dict[str, Any] = field(default_factory=dict)  # merged into the JSON
    output: str = "runs/demo"
    log_every: int = 1  # optimizer steps between metrics.jsonl / TensorBoard rows
    val_every: int = 50  # optimizer steps between validations (0 = only at the end)
    ckpt_every: int = 50  # optimizer steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 2  # complete checkpoints kept on disk (older ones deleted)
    retrieval_k: list[int] = field(default_factory=lambda: [1, 5, 10])
    # >0: reuse the first N micro-batches forever (overfitting sanity check).
    overfit_batches: int = 0
    seed: int = 0  # torch RNG seed (model init, dropout); rank is added for dropout streams
    # >0: keep an exponential moving average of the weights (ctprep_train.ema; e.g. 0.99); validation
    # and the encoder exports use it, training steps the live weights. ZeRO stages 0-2 only.
    ema_decay: float = 0.0
    progress_bar: bool = True
    # torch intra-op threads per rank on CPU (0 = torch's default). OpenMP threads spin at
    # barriers, so oversubscribed cores (loader threads, other jobs) can cost 10x per step.
    cpu_threads: int = 0
    # Precision of CPU ranks (the JSON's torch_autocast / bf16 blocks): auto = bf16 as the JSON says where
    # the CPU runs it natively (oneDNN: AVX-512 or AMX), fp32 elsewhere, where bf16 convolutions fall back
    # to a reference loop (15-25x slower per step in the CPU demo); bf16 = as the JSON says; fp32 = fp32 on every CPU.
    # GPU ranks always follow the JSON.
    cpu_precision: str = "auto"
    # BatchNorm layers (vision.head_norm / vision.patch.stem_norm: batch) normalise over each rank's
    # micro-batch by default, as DDP does. true: torch.nn.SyncBatchNorm over all ranks (GPU ranks
    # only: torch syncs BN statistics for CUDA tensors, not over gloo/CPU). No-op on one rank.
    sync_batchnorm: bool = False
    # Tracking sinks beside metrics.jsonl (ctprep_train.tracking.REPORT_TO): tensorboard, mlflow.
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    # MLflow store when report_to has mlflow; "" = sqlite:///<folder above train.output>/mlflow.db
    # (offline, no server). Any MLflow tracking URI works (another sqlite file, http://host:5000).
    mlflow_uri: str = ""
    mlflow_experiment: str = "ctprep"  # MLflow experiment the run is filed under


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # ctprep_train.augment (off by default)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _resolve_extends(parent: str, child: Path) -> Path:
    """``extends:`` of a training YAML: a path as given, else relative to the file naming it."""
    path = Path(parent)
    if not path.is_absolute() and not path.is_file():
        path = child.parent / parent
    if not path.is_file():
        raise ConfigError(f"{child}: extends {parent!r}: no such file (as given or beside {child.name})")
    return path


def read_config_tree(path: str | Path) -> dict[str, Any]:
    """A training YAML as one plain tree: the files its ``extends:`` chain names merged, untyped."""
    return read_yaml_chain(path, _resolve_extends)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a training YAML, apply dotted ``key=value`` overrides, and type-check the sections."""
    tree: dict[str, Any] = {}
    if path is not None:
        tree = read_config_tree(path)
    for item in overrides:
        apply_override(tree, item)
    cfg = from_dict(Config, tree)
    if path is not None:
        cfg.train.deepspeed = str(_find_beside(cfg.train.deepspeed, Path(path)))
    _check(cfg)
    return cfg


def _find_beside(relative: str, config_file: Path) -> Path:
    """A relative path as given if it exists from the working directory, else looked up from
    the YAML's folder upwards (so ``configs/deepspeed/zero2.json`` in
    ``configs/train/demo.yaml`` works from any directory)."""
    candidate = Path(relative)
    if candidate.is_absolute() or candidate.exists():
        return candidate
    for folder in config_file.resolve().parents:
        if (folder / candidate).exists():
            return folder / candidate
    return candidate


CPU_PRECISION = ("auto", "bf16", "fp32")


def _check(cfg: Config) -> None:
    if cfg.data.batch_size < 1:
        raise ConfigError("data.batch_size must be >= 1")
    if len(cfg.data.patch_size) != 3:
        raise ConfigError("data.patch_size must be [pz, py, px]")
    if not any(w > 0 for w in cfg.data.sources.values()):
        raise ConfigError("data.sources needs at least one source with a weight > 0")
    if cfg.train.steps < 0:
        raise ConfigError("train.steps must be >= 0")
    aug = cfg.augment
    if len(aug.shift_voxels) != 3 or any(int(v) < 0 for v in aug.shift_voxels):
        raise ConfigError(f"augment.shift_voxels must be three non-negative voxel counts (z, y, x), got {aug.shift_voxels}")
    if min(aug.hu_scale, aug.hu_offset, aug.noise_hu) < 0 or aug.hu_scale >= 1:
        raise ConfigError("augment.hu_scale must be in [0, 1), augment.hu_offset and augment.noise_hu >= 0")
    if not 0 <= aug.zoom < 0.5:
        raise ConfigError(f"augment.zoom must be in [0, 0.5), got {aug.zoom}")
    if cfg.data.read_threads < 1:
        raise ConfigError("data.read_threads must be >= 1")
    if not 0.0 <= cfg.data.mask_dropout <= 1.0:
        raise ConfigError(f"data.mask_dropout must be a probability in [0, 1], got {cfg.data.mask_dropout}")
    for sink in cfg.train.report_to:
        look_up_option(sink, REPORT_TO, "train.report_to entry")
    look_up_option(cfg.train.cpu_precision, CPU_PRECISION, "train.cpu_precision")
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay must be in [0, 1) (0 = off), got {cfg.train.ema_decay}")


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_deepspeed_config(cfg: Config) -> dict[str, Any]:
    """Read the DeepSpeed JSON and fill in what the YAML owns (micro batch size).

    The JSON owns the ZeRO stage, bf16, gradient accumulation and clipping; ``"auto"``
    for ``gradient_accumulation_steps`` means 1. The optimizer and scheduler are built by the
    trainer (torch AdamW + warmup/cosine), so an ``optimizer``/``scheduler`` block is refused
    rather than silently ignored.
    """
    ds = json.loads(Path(cfg.train.deepspeed).read_text())
    ds = _merge(ds, cfg.train.deepspeed_overrides)
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(
                f"{cfg.train.deepspeed}: remove '{key}'; the trainer builds it from the 'optim' section"
            )
    ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from micro batch x accumulation x world
    if ds.get("gradient_accumulation_steps", "auto") == "auto":
        ds["gradient_accumulation_steps"] = 1
    ds.setdefault("steps_per_print", 10**9)  # we log ourselves
    return ds
