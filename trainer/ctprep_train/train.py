"""Train CTCLIP on streamed shards with DeepSpeed (ZeRO 2/3, bf16), resumable.

Launch (any of)::

    deepspeed trainer/train.py --config configs/train/demo.yaml [--shards DIR] [--output runs/NAME]
    torchrun --nproc_per_node 2 trainer/train.py --config configs/train/demo.yaml
    python trainer/train.py --config configs/train/demo.yaml      # one process
    ... [--resume auto|latest|PATH] [key=value ...]                # e.g. optim.lr=1e-4 train.steps=20

A plain ``python`` run has no launcher environment; it creates a one-rank process group
(gloo on CPU, nccl on GPU) on a free local port and still uses the DeepSpeed engine, so that
the code path, the ZeRO checkpoint format and ``--resume`` are the same as for a cluster run.
On a machine without CUDA DeepSpeed picks its CPU accelerator (or set ``DS_ACCELERATOR=cpu``).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ctprep_train import checkpoint as ckpt
from ctprep_train import data as data_lib
from ctprep_train import tracking
from ctprep_train.augment import augment_batch
from ctprep_train.config import Config, ConfigError, load_config, load_deepspeed_config
from ctprep_train.ema import WeightEma
from ctprep_train.export import export_metadata
from ctprep_train.run_log import RunLog


# --------------------------------------------------------------------------- arguments / env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="training YAML (configs/train/*.yaml)")
    parser.add_argument("--shards", help="shard folder with index.json (overrides data.shards)")
    parser.add_argument("--output", help="run folder (overrides train.output)")
    parser.add_argument("--resume", help="'auto' (or 'latest') = newest complete checkpoint of --output, "
                        "or a checkpoint folder")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=1e-4")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if args.shards:
        overrides.append(f"data.shards={args.shards}")
    if args.output:
        overrides.append(f"train.output={args.output}")
    return load_config(args.config, overrides)


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> DistInfo:
    """Join the launcher's process group, or make a one-rank group for a plain ``python`` run."""
    if "RANK" not in os.environ:  # not under deepspeed/torchrun: single process
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def resolve_object(spec: str) -> Any:
    """``'package.module:attr'`` -> the attribute; ``'package.module'`` -> the module."""
    module_name, _, attr = spec.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attr) if attr else module


# --------------------------------------------------------------------------- builders


def build_model(cfg: Config) -> torch.nn.Module:
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    library = resolve_object(cfg.model.module)
    model = library.create_model(cfg.model.name, **cfg.model.overrides)
    if cfg.data.batch_size < 2 and any(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules()):
        raise ConfigError(
            f"data.batch_size {cfg.data.batch_size}: the model has a BatchNorm head (vision.head_norm: batch), "
            "which needs >= 2 samples per rank per micro-step; raise data.batch_size or set "
            "model.overrides vision.head_norm: none"
        )
    return model


def apply_sync_batchnorm(model: torch.nn.Module, cfg: Config, info: DistInfo) -> torch.nn.Module:
    """``train.sync_batchnorm``: swap every BatchNorm for ``torch.nn.SyncBatchNorm`` when the run has
    more than one rank, so the statistics cover the global batch (SimCLR / MoCo v3 practice for a
    BN projection head). The parameters and buffers keep their names and shapes, so checkpoints and
    the encoder export are unchanged. A no-op on one rank or without BatchNorm; on CPU ranks it
    stops with a ConfigError (torch synchronises BN statistics only for accelerator tensors)."""
    if not cfg.train.sync_batchnorm or info.world_size == 1:
        return model
    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    if info.device.type == "cpu":
        raise ConfigError(
            f"train.sync_batchnorm: true needs GPU ranks ({info.world_size} CPU ranks here): torch's "
            "SyncBatchNorm does not synchronise over gloo/CPU; set it to false (per-rank statistics)"
        )
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def promote_scalar_params(model: torch.nn.Module) -> list[str]:
    """Give 0-dim parameters (logit scales) shape (1,), in place; returns their names.

    DeepSpeed 0.19.8 broadcasts every parameter as ``p.data.view(torch.uint8)`` when the engine
    is built, which raises for 0-dim tensors ("self.dim() cannot be 0 to view ..."), under
    ZeRO 2 and 3 alike. A (1,)-shaped parameter behaves the same in ``p.exp().clamp(...)``; the
    encoder export reshapes it back (checkpoint.export_encoder loads by the fresh model's shapes).
    """
    names = []
    for module_name, module in model.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.ndim == 0:
                setattr(module, name, torch.nn.Parameter(param.detach().reshape(1), requires_grad=param.requires_grad))
                names.append(f"{module_name}.{name}" if module_name else name)
    return names


def build_loss(cfg: Config) -> Callable:
    factory = resolve_object(cfg.loss.factory)
    # MultiTaskLoss takes one flat dict: term weights (clip, region, step, labels) + options.
    return factory({**cfg.loss.weights, **cfg.loss.options})


def expected_tokenizer(cfg: Config, model: torch.nn.Module) -> dict[str, str] | None:
    """The tokenizer identity the shards must carry (see DataConfig.tokenizer)."""
    choice = cfg.data.tokenizer
    if isinstance(choice, dict):
        return {"name": str(choice["name"]), "hash": str(choice["hash"])}
    if choice == "index":
        return None
    if choice == "model":
        from ctprep.tokenizer import tokenizer_identity

        text_cfg = getattr(getattr(model, "cfg", None), "text", None)
        return tokenizer_identity(getattr(text_cfg, "path", None))
    raise ValueError(f"data.tokenizer must be 'model', 'index' or {{name, hash}}, got {choice!r}")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay for biases, norms, embeddings/tokens and the logit scales."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name in skip or name.endswith(".bias"):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    # A torch optimizer (not DeepSpeed's fused/CPU Adam): no C++ build on first use, works
    # on CPU and GPU and under ZeRO 2 and 3 (ZeRO wraps whichever optimizer it is given).
    o = cfg.optim
    return torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)


def warmup_cosine(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear 0 -> 1 over ``warmup`` steps, then cosine 1 -> ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    o = cfg.optim
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: warmup_cosine(s, warmup=o.warmup_steps, total=cfg.train.steps, min_ratio=o.min_lr_ratio),
    )


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 on this CPU (AVX-512 / AMX); without it bf16 convolutions take a slow loop."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without the op: ask for the ISA instead
        return "AVX512" in str(torch.backends.cpu.get_cpu_capability()).upper()


def cpu_precision(ds: dict[str, Any], policy: str, device: torch.device, native_bf16: bool) -> tuple[dict[str, Any], str | None]:
    """The DeepSpeed config with bf16 turned off on a CPU rank when ``train.cpu_precision`` asks for it.

    Returns (config, note): ``note`` says what was turned off and why (None: nothing changed).
    """
    wants_bf16 = bool(ds.get("torch_autocast", {}).get("enabled")) or bool(ds.get("bf16", {}).get("enabled"))
    if device.type != "cpu" or not wants_bf16 or policy == "bf16" or (policy == "auto" and native_bf16):
        return ds, None
    ds = {**ds, "torch_autocast": {**ds.get("torch_autocast", {}), "enabled": False},
          "bf16": {**ds.get("bf16", {}), "enabled": False}}
    why = ("train.cpu_precision=fp32" if policy == "fp32" else
           "this CPU has no native bf16 (oneDNN needs AVX-512 or AMX): bf16 convolutions would run a reference "
           "loop (15-25x slower per step than fp32 in the CPU demo) (train.cpu_precision=bf16 keeps bf16)")
    return ds, f"training in fp32 on CPU: {why}"


def build_engine(cfg: Config, model, optimizer, scheduler, device: torch.device):
    import deepspeed

    ds, note = cpu_precision(load_deepspeed_config(cfg), cfg.train.cpu_precision, device,
                             cpu_has_native_bf16() if device.type == "cpu" else False)
    if note and (not dist.is_initialized() or dist.get_rank() == 0):
        print(f"[train] {note}", file=sys.stderr)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
    return engine


# --------------------------------------------------------------------------- steps


def move_batch(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    non_blocking = device.type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in batch.items()}


def prepare_outputs(outputs: dict[str, Any], max_logit_scale: float) -> dict[str, Any]:
    """fp32 outputs for the loss (bf16 logits lose too much) and clamped logit scales."""
    out = {}
    for key, value in outputs.items():
        if torch.is_tensor(value) and value.is_floating_point():
            value = value.float()
            if key.endswith("logit_scale"):
                value = value.clamp(max=max_logit_scale).reshape(())  # () even if promoted to (1,)
        out[key] = value
    return out


def batches_for_training(loader, overfit_batches: int) -> Iterator[dict[str, Any]]:
    """The loader's endless stream, or its first ``overfit_batches`` batches repeated."""
    if overfit_batches <= 0:
        yield from loader
        return
    cached = []
    for batch in loader:
        cached.append(batch)
        if len(cached) == overfit_batches:
            break
    while True:
        yield from cached


@dataclass
class StepResult:
    loss: float
    terms: dict[str, float]
    samples: int
    data_wait_s: float
    step_s: float
    corrupt: int
    logit_scale: float


def train_step(engine, loss_fn, batches: Iterator[dict[str, Any]], cfg: Config, device: torch.device) -> StepResult:
    """One optimizer step = ``gradient_accumulation_steps`` micro-batches."""
    start = time.perf_counter()
    wait = 0.0
    total, terms, samples, corrupt, scale = 0.0, {}, 0, 0, float("nan")
    accum = engine.gradient_accumulation_steps()
    for micro in range(accum):
        t0 = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t0
        stats = batch.pop(data_lib.BATCH_STATS_KEY, {})
        corrupt += int(stats.get("corrupt", 0))
        batch = move_batch(batch, device)
        if cfg.augment.enabled:  # seeded by (seed, rank, micro-batch): a resumed run repeats it
            batch = augment_batch(batch, cfg.augment, cfg.data.patch_size, seed=cfg.train.seed,
                                  rank=dist.get_rank(), step=engine.global_steps * accum + micro)
        outputs = prepare_outputs(engine(batch), cfg.loss.max_logit_scale)
        loss, parts = loss_fn(outputs, batch)
        engine.backward(loss)
        engine.step()
        total += float(loss.detach()) / accum
        for name, value in parts.items():  # "loss_<term>": a term may be called "step"
            terms[f"loss_{name}"] = terms.get(f"loss_{name}", 0.0) + float(value) / accum
        samples += len(batch["ids"])
        if "logit_scale" in outputs:
            scale = float(outputs["logit_scale"].detach())
    return StepResult(total, terms, samples, wait, time.perf_counter() - start, corrupt, scale)


def _mean_across_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    if dist.get_world_size() == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def _gather_rows(x: torch.Tensor) -> torch.Tensor:
    """all_gather along dim 0 allowing a different row count per rank (a skipped corrupt sample)."""
    world = dist.get_world_size()
    if world == 1:
        return x
    count = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([o[:n] for o, n in zip(out, sizes)])


def retrieval_summary(img: torch.Tensor, txt: torch.Tensor, text_keys: list[int] | None, ks: list[int]) -> dict[str, float]:
    """R@K both ways on the validation pool (ctprep_train.eval.metrics protocol; identical reports merged)."""
    from ctprep_train.eval.metrics import retrieval_metrics

    result = retrieval_metrics(img, txt, text_keys=text_keys, ks=ks)
    out = {"pool_size": float(result["pool_size"])}
    for direction in ("image_to_text", "text_to_image"):
        for key, value in result[direction].items():
            if key.startswith("R@") or key in ("mean_rank", "median_rank"):
                out[f"{direction}/{key}"] = float(value)
    return out


def _text_key(meta: dict[str, Any]) -> int:
    """A 63-bit hash of the report text, so duplicate reports can be merged after an all_gather."""
    digest = hashlib.sha1(str(meta.get("report_text", meta.get("id", ""))).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@torch.no_grad()
def validate(engine, loss_fn, loader, cfg: Config, device: torch.device) -> dict[str, float]:
    """Validation loss (mean over batches and ranks) + retrieval R@K over the whole valid pool.

    Every rank runs the same number of batches (ValidBatches pads), so ZeRO-3's parameter
    gathering and the losses' all_gather stay in step; embeddings of padded duplicates are
    dropped by their position in the validation list.
    """
    engine.eval()
    sums: dict[str, float] = {}
    batches = 0
    images, texts, positions, keys = [], [], [], []
    for batch in loader:
        stats = batch.pop(data_lib.BATCH_STATS_KEY, {})
        batch = move_batch(batch, device)
        outputs = prepare_outputs(engine(batch), cfg.loss.max_logit_scale)
        loss, parts = loss_fn(outputs, batch)
        for name, value in {"loss": loss, **{f"loss_{k}": v for k, v in parts.items()}}.items():
            sums[name] = sums.get(name, 0.0) + float(value)
        batches += 1
        if "image_embed" in outputs and "text_embed" in outputs:
            images.append(outputs["image_embed"].float().cpu())
            texts.append(outputs["text_embed"].float().cpu())
            positions.append(torch.tensor(stats.get("positions", []), dtype=torch.int64))
            keys.append(torch.tensor([_text_key(m) for m in batch["meta"]], dtype=torch.int64))
    engine.train()
    result = _mean_across_ranks({k: v / max(1, batches) for k, v in sums.items()}, device)
    if images:
        img = _gather_rows(torch.cat(images).to(device)).cpu()
        txt = _gather_rows(torch.cat(texts).to(device)).cpu()
        pos = _gather_rows(torch.cat(positions).to(device)).cpu()
        text_keys = _gather_rows(torch.cat(keys).to(device)).cpu()
        keep: dict[int, int] = {}
        for row, p in enumerate(pos.tolist()):
            keep.setdefault(p, row)
        rows = torch.tensor([keep[p] for p in sorted(keep)])
        result.update(retrieval_summary(img[rows], txt[rows], text_keys[rows].tolist(), cfg.train.retrieval_k))
    return result


# --------------------------------------------------------------------------- run


def client_state(step: int, cfg: Config, engine, world_size: int, steps_per_epoch: int) -> dict[str, Any]:
    micro = step * engine.gradient_accumulation_steps()
    return {
        "step": step,
        "micro_batches": micro,  # per rank: the data stream position to skip to on resume
        "data_epoch": micro // max(1, steps_per_epoch),
        "world_size": world_size,
        "gradient_accumulation_steps": engine.gradient_accumulation_steps(),
        "data_seed": cfg.data.seed,
    }


def run(cfg: Config, resume: str | None = None) -> dict[str, Any]:
    """Train; return a summary (final step, last train/valid metrics)."""
    info = init_distributed()
    if info.device.type == "cpu" and cfg.train.cpu_threads > 0:
        torch.set_num_threads(cfg.train.cpu_threads)
    output = Path(cfg.train.output)
    is_main = info.rank == 0
    if is_main:
        output.mkdir(parents=True, exist_ok=True)
        (output / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))

    model = apply_sync_batchnorm(build_model(cfg), cfg, info)
    data = build_shard_data(cfg, model, is_main)
    library = resolve_object(cfg.model.module)
    loss_fn = build_loss(cfg)
    promote_scalar_params(model)
    optimizer = build_optimizer(cfg, model)
    engine = build_engine(cfg, model, optimizer, build_scheduler(cfg, optimizer), info.device)
    resume_dir, start_step, micro_batches = resume_checkpoint(engine, output, resume, info)
    ema = build_ema(cfg, engine, resume_dir, info)
    train_loader, valid_loader, steps_per_epoch = build_loaders(cfg, data, info, micro_batches)
    batches = batches_for_training(train_loader, cfg.train.overfit_batches)

    runlog = RunLog(output, enabled=is_main, total_steps=cfg.train.steps, start_step=start_step,
                    progress_bar=cfg.train.progress_bar, open_sinks=lambda: tracking.open_sinks(
                        cfg.train.report_to, output, start_step=start_step, params=cfg.to_dict(),
                        mlflow_uri=cfg.train.mlflow_uri, mlflow_experiment=cfg.train.mlflow_experiment))
    if resume_dir is not None:
        runlog.write("resume", start_step, {"checkpoint": str(resume_dir)})

    def save(step: int) -> None:
        ckpt.save_checkpoint(
            engine, output, step, client_state(step, cfg, engine, info.world_size, steps_per_epoch),
            rank=info.rank, keep=cfg.train.keep_checkpoints,
            build_fresh_model=lambda: library.create_model(cfg.model.name, **cfg.model.overrides),
            save_pretrained=library.save_pretrained, tokenizer=data.index.tokenizer, export_metadata=data.export_meta,
            ema=ema,
        )

    step, last = train_loop(engine, loss_fn, batches, valid_loader, cfg, info, runlog, save,
                            start_step=start_step, steps_per_epoch=steps_per_epoch, resumed=resume_dir is not None,
                            ema=ema)
    runlog.close()
    dist.barrier()
    return {"step": step, **last}


@dataclass
class ShardData:
    """The shards a run trains on: what they must match, their index, what the export records."""

    expect: Any  # ctprep_train.data expectation (tokenizer identity, format versions)
    index: Any  # ctprep_train.data shard index (shards, counts, tokenizer)
    export_meta: dict[str, Any] | None  # preprocessing / data record for the encoder export (rank 0 only)


def build_shard_data(cfg: Config, model: torch.nn.Module, is_main: bool) -> ShardData:
    """Load the shard index checked against the model's tokenizer; rank 0 also reads the build manifest."""
    tokenizer = expected_tokenizer(cfg, model)
    expect = data_lib.expectation_from_config(cfg.data, tokenizer)
    index = data_lib.load_shard_index(cfg.data.shards, expect)
    # What the encoder export records about preprocessing and data (the shards' build manifest).
    export_meta = export_metadata(cfg.data.shards, index.raw) if is_main else None
    for warning in (export_meta or {}).get("warnings", []):
        print(f"[train] encoder export: {warning}", file=sys.stderr)
    return ShardData(expect, index, export_meta)


def resume_checkpoint(engine, output: Path, resume: str | None, info: DistInfo) -> tuple[Path | None, int, int]:
    """(checkpoint folder or None, optimizer steps done, micro-batches done) after loading ``--resume``."""
    start_step, micro_batches = 0, 0
    resume_dir = ckpt.resolve_resume(output, resume)
    if resume_dir is not None:
        state = ckpt.load_checkpoint(engine, resume_dir)
        start_step, micro_batches = int(state["step"]), int(state["micro_batches"])
        if state.get("world_size") != info.world_size and info.rank == 0:
            print(f"[train] resuming a {state.get('world_size')}-rank run on {info.world_size} ranks: "
                  "the data order differs from an uninterrupted run", file=sys.stderr)
    return resume_dir, start_step, micro_batches


def build_ema(cfg: Config, engine, resume_dir: Path | None, info: DistInfo) -> WeightEma | None:
    """The weight average of ``train.ema_decay`` (None when 0), continued from ``resume_dir`` if it has one."""
    if cfg.train.ema_decay <= 0:
        return None
    stage = int(load_deepspeed_config(cfg).get("zero_optimization", {}).get("stage", 0))
    if stage >= 3:
        raise ConfigError(f"train.ema_decay needs the full weights on every rank: ZeRO stage 0-2, not {stage} "
                          f"({cfg.train.deepspeed})")
    ema = WeightEma(engine.module, cfg.train.ema_decay)
    if resume_dir is not None and not ema.load(resume_dir) and info.rank == 0:
        print(f"[train] {resume_dir} has no weight average: it starts again from the resumed weights",
              file=sys.stderr)
    return ema


def build_loaders(cfg: Config, data: ShardData, info: DistInfo, micro_batches: int):
    """(train loader resumed after ``micro_batches``, valid loader or None, micro-batches per rank per epoch)."""
    samples = data_lib.samples_per_epoch(data.index, cfg.data)
    steps_per_epoch = max(1, samples // (cfg.data.batch_size * info.world_size))  # micro-batches per rank
    train_loader = data_lib.build_train_loader(
        cfg.data, data.index, data.expect, rank=info.rank, world_size=info.world_size, start_batch=micro_batches
    )
    valid_loader = data_lib.build_valid_loader(cfg.data, data.index, data.expect, rank=info.rank,
                                               world_size=info.world_size)
    return train_loader, valid_loader, steps_per_epoch


def train_loop(engine, loss_fn, batches, valid_loader, cfg: Config, info: DistInfo, runlog: RunLog,
               save: Callable[[int], None], *, start_step: int, steps_per_epoch: int, resumed: bool,
               ema: WeightEma | None = None) -> tuple[int, dict[str, Any]]:
    """Optimizer steps up to ``cfg.train.steps`` with logging, validation and checkpoints; (step, last rows).

    With ``ema`` the average follows every step and validation runs with it."""
    last: dict[str, Any] = {}
    corrupt_total = 0
    step = start_step
    saved_step = start_step if resumed else -1
    engine.train()
    while step < cfg.train.steps:
        # Per-step seed: dropout/drop-path streams replay exactly after a resume.
        torch.manual_seed(cfg.train.seed + 1_000_003 * step + info.rank)
        result = train_step(engine, loss_fn, batches, cfg, info.device)
        step += 1
        if ema is not None:
            ema.update(engine.module)
        corrupt_total += result.corrupt
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            row = train_row(engine, result, info, step, steps_per_epoch, corrupt_total)
            runlog.write("train", step, row)
            runlog.progress(step, {"loss": row["loss"], "lr": row["lr"]})
            last["train"] = row
        if valid_loader is not None and cfg.train.val_every and step % cfg.train.val_every == 0:
            with ema.applied(engine.module) if ema is not None else nullcontext():
                last["valid"] = validate(engine, loss_fn, valid_loader, cfg, info.device)
            runlog.write("valid", step, last["valid"])
        if cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0:
            save(step)
            saved_step = step
    if valid_loader is not None and (not cfg.train.val_every or step % cfg.train.val_every) and step > start_step:
        with ema.applied(engine.module) if ema is not None else nullcontext():
            last["valid"] = validate(engine, loss_fn, valid_loader, cfg, info.device)
        runlog.write("valid", step, last["valid"])
    if saved_step != step:
        save(step)
    return step, last


def train_row(engine, result: StepResult, info: DistInfo, step: int, steps_per_epoch: int,
              corrupt_total: int) -> dict[str, float]:
    """The ``train`` row of metrics.jsonl: losses averaged over ranks (a collective), rates, schedule."""
    row = _mean_across_ranks({"loss": result.loss, **result.terms}, info.device)
    row.update(
        lr=engine.get_lr()[0],
        logit_scale=result.logit_scale,
        temperature=1.0 / result.logit_scale if result.logit_scale > 0 else float("nan"),
        samples_per_s=result.samples * info.world_size / max(result.step_s, 1e-9),
        data_wait_frac=result.data_wait_s / max(result.step_s, 1e-9),
        epoch=(step * engine.gradient_accumulation_steps()) / steps_per_epoch,
        corrupt_skipped=corrupt_total,
    )
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    summary = run(build_config(args), resume=args.resume)
    if dist.is_initialized():
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
