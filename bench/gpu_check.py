"""One-shot GPU check: environment, encoder throughput / MFU / memory, and a short DeepSpeed run.

    bash bench/gpu_check.sh                  # on one GPU (target: H200, under 8 minutes)
    bash bench/gpu_check.sh --dry-run        # CPU, tiny sizes: checks this script's own wiring

Sections (each one is timed, isolated and reported; a failure becomes a table row, not a crash):

1. environment: nvidia-smi, torch / CUDA / cuDNN / DeepSpeed versions, device name.
2. encoder: the ``base`` vision encoder on a (Z, Y, X) = 64 x 512 x 512 volume (16,384 patches +
   CLS = 16,385 tokens) in bf16 autocast with the FlexAttention slice bias: forward + backward
   samples/s, model TFLOP/s and MFU (FLOPs counted analytically, see ``encoder_flops``), peak memory,
   for micro-batch 1, 2, 4, ... until one does not fit.
3. reference: the same with the materialized-bias ``reference`` kernel, from the largest micro-batch
   that fitted with flex down until one fits, to show the memory gap.
4. zero2: ``trainer/train.py`` for 50 steps under DeepSpeed ZeRO-2 on demo shards (built by the
   pipeline unless ``--shards`` is given), reading its ``metrics.jsonl``.

The MFU denominator is ``--peak-tflops`` (default 989: NVIDIA's H200 SXM dense BF16 Tensor Core
figure, i.e. the 1,979 TFLOP/s "with sparsity" number halved). MFU counts *model* FLOPs: gradient
checkpointing recompute is not counted, and backward is taken as 2x forward.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

if not __package__:  # run as a file (python bench/gpu_check.py): Python put bench/, not the repository, on the path
    sys.path.insert(0, str(REPO))

from bench.flops import H200_BF16_DENSE_TFLOPS, encoder_flops, train_flops_per_sample  # noqa: E402,F401 (re-exported)


# --------------------------------------------------------------------------- result rows


@dataclass
class Row:
    section: str
    config: str
    values: dict = field(default_factory=dict)
    status: str = "ok"


def format_table(rows: list[Row]) -> str:
    cols = ["section", "config", "status", "samples/s", "TFLOP/s", "MFU", "peak GiB", "notes"]
    lines = []
    for row in rows:
        v = row.values
        lines.append(
            [
                row.section,
                row.config,
                row.status,
                _fmt(v.get("samples_per_s"), "{:.2f}"),
                _fmt(v.get("tflops"), "{:.3g}"),
                _fmt(v.get("mfu"), "{:.1%}"),
                _fmt(v.get("peak_gib"), "{:.1f}"),
                str(v.get("notes", "")),
            ]
        )
    widths = [max(len(c), *(len(line[i]) for line in lines)) if lines else len(c) for i, c in enumerate(cols)]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |"]
    out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for line in lines:
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |")
    return "\n".join(out)


def _fmt(value, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return "-"
    return spec.format(value)


# --------------------------------------------------------------------------- environment


def environment_report() -> list[Row]:
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda (torch build)": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda available": torch.cuda.is_available(),
    }
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except Exception as exc:  # a broken DeepSpeed install is a finding, not a crash
        info["deepspeed"] = f"import failed: {exc}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["device"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}"
        info["devices"] = torch.cuda.device_count()
    smi = shutil.which("nvidia-smi")
    if smi:
        res = subprocess.run(
            [smi, "--query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        info["nvidia-smi"] = (res.stdout or res.stderr).strip().replace("\n", " ; ")
    else:
        info["nvidia-smi"] = "not found"
    return [Row("env", key, {"notes": str(value)}) for key, value in info.items()]


# --------------------------------------------------------------------------- encoder benchmark


@dataclass
class EncoderSetup:
    model_name: str
    grid_zyx: tuple[int, int, int]
    device: str
    amp_dtype: str  # "bf16" | "fp32"
    steps: int
    warmup: int
    overrides: dict


def build_visual(setup: EncoderSetup, kernel: str):
    """The vision encoder of model config ``model_name`` with ``kernel`` for slice attention.

    Only ``VisionEncoder3D`` is built (as ``CTCLIP`` builds it): the text tower plays no part in
    the encoder numbers and would only load weights.
    """
    import torch

    from ctprep_train.model import VisionEncoder3D, get_model_config

    cfg = get_model_config(setup.model_name, **{"vision.attention.kernel": kernel, **setup.overrides})
    visual = VisionEncoder3D(cfg.vision, embed_dim=cfg.embed_dim).to(torch.device(setup.device))
    visual.train()
    return visual, cfg


def synthetic_batch(vision, grid_zyx, batch_size: int, device: str) -> dict:
    """An encoder input batch in the trainer's collate format (image int16, mask uint8, regions)."""
    import torch

    z, y, x = grid_zyx
    pz, py, px = vision.patch.patch_size
    patches = (z // pz) * (y // py) * (x // px)
    r = vision.anatomy.max_regions
    gen = torch.Generator().manual_seed(0)
    image = torch.randint(-1024, 1500, (batch_size, z, y, x), dtype=torch.int16, generator=gen)
    mask = torch.randint(0, r + 1, (batch_size, z, y, x), dtype=torch.uint8, generator=gen)
    regions = torch.rand(batch_size, patches, r + 1, generator=gen)
    regions = regions / regions.sum(-1, keepdim=True)
    batch = {"image": image, "mask": mask, "regions": regions.to(torch.float16)}
    return {k: v.to(device) for k, v in batch.items()}


def encoder_loss(visual, batch):
    """A scalar that depends on every encoder output, so backward reaches every parameter in use."""
    out = visual(batch["image"], batch["mask"], batch["regions"])
    tensors = out.values() if isinstance(out, dict) else (out if isinstance(out, (tuple, list)) else [out])
    total = 0.0
    for t in tensors:
        if hasattr(t, "dtype") and t.is_floating_point():
            total = total + t.float().square().mean()
    return total


class OutOfMemory(Exception):
    pass


def time_train_steps(visual, batch, setup: EncoderSetup) -> dict:
    """Mean seconds per forward + backward step after ``warmup`` steps, and peak memory."""
    import torch

    cuda = setup.device.startswith("cuda")
    dtype = torch.bfloat16 if setup.amp_dtype == "bf16" else torch.float32
    autocast = torch.autocast(device_type="cuda" if cuda else "cpu", dtype=dtype, enabled=setup.amp_dtype == "bf16")

    def step():
        with autocast:
            loss = encoder_loss(visual, batch)
        loss.backward()
        for p in visual.parameters():
            p.grad = None

    try:
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(setup.warmup):
            step()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(setup.steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / setup.steps
    except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
        # Triton / compiled kernels can report OOM as a plain RuntimeError.
        if not isinstance(exc, torch.cuda.OutOfMemoryError) and "out of memory" not in str(exc):
            raise
        message = str(exc).splitlines()[0]
        del exc  # drop the traceback's frames (and their tensors) before freeing the cache
        for p in visual.parameters():
            p.grad = None
        gc.collect()
        torch.cuda.empty_cache()
        raise OutOfMemory(message) from None
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return {"seconds_per_step": seconds, "peak_gib": peak}


def sweep_micro_batches(measure, sizes: list[int], deadline: float) -> tuple[list[tuple[int, dict | str]], int | None]:
    """Run ``measure(batch_size)`` for each size until one raises ``OutOfMemory`` (or time runs out).

    Returns ([(size, result or reason)], largest size that fitted or None).
    """
    results: list[tuple[int, dict | str]] = []
    largest = None
    for size in sizes:
        if time.monotonic() > deadline:
            results.append((size, "skipped: time budget"))
            break
        try:
            results.append((size, measure(size)))
            largest = size
        except OutOfMemory as exc:
            results.append((size, f"OOM ({exc})"[:120]))
            break
    return results, largest


def encoder_rows(setup: EncoderSetup, kernel: str, sizes: list[int], peak_tflops: float, deadline: float, section: str):
    import torch

    visual, cfg = build_visual(setup, kernel)
    forward = encoder_flops(cfg.vision, setup.grid_zyx, cfg.vision.anatomy.max_regions + 1)
    per_sample = train_flops_per_sample(forward)

    def measure(bs: int) -> dict:
        batch = synthetic_batch(cfg.vision, setup.grid_zyx, bs, setup.device)
        try:
            res = time_train_steps(visual, batch, setup)
        finally:
            del batch
        sps = bs / res["seconds_per_step"]
        tflops = per_sample * sps / 1e12
        return {
            "samples_per_s": sps,
            "tflops": tflops,
            "mfu": tflops / peak_tflops if peak_tflops else None,
            "peak_gib": res["peak_gib"],
            "notes": f"{res['seconds_per_step'] * 1e3:.0f} ms/step",
        }

    results, largest = sweep_micro_batches(measure, sizes, deadline)
    rows = []
    tokens = math.prod(g // p for g, p in zip(setup.grid_zyx, cfg.vision.patch.patch_size)) + 1
    label = f"{setup.model_name} {'x'.join(map(str, setup.grid_zyx))} ({tokens} tok) {kernel} {setup.amp_dtype}"
    for bs, res in results:
        if isinstance(res, dict):
            rows.append(Row(section, f"{label} mb={bs}", res))
        else:
            rows.append(Row(section, f"{label} mb={bs}", {"notes": res}, status="OOM" if res.startswith("OOM") else "skip"))
    del visual
    if setup.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows, largest, per_sample, cfg.vision.grad_checkpointing


# --------------------------------------------------------------------------- ZeRO-2 run


def build_demo_shards(out: Path, cases: int, env: dict, workers: int) -> Path:
    """Synthetic CT-RATE -> shards with the pipeline's own commands (as `make demo` does).

    ``workers`` local Dask processes (0 = in process, the dry run: no cluster start-up).
    """
    ctprep = [sys.executable, "-m", "ctprep.cli"]
    demo = ["demo-data", "--out", str(out / "ctrate"), "--source", "ctrate", "--cases", str(cases), "--grid", "demo", "--seed", "0"]
    build = ["build-shards", "--src", str(out / "ctrate"), "--out", str(out / "shards"), "--workers", str(workers), "--no-progress"]
    for cmd in (demo, build):
        res = subprocess.run([*ctprep, *cmd], env=env, capture_output=True, text=True)
        if res.returncode != 0:
            tail = " / ".join((res.stderr or res.stdout).strip().splitlines()[-3:])
            raise RuntimeError(f"ctprep {cmd[0]} failed ({res.returncode}): {tail}")
    return out / "shards"


def zero2_rows(args, deadline: float) -> list[Row]:
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    try:
        return _zero2_rows(args, deadline, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _zero2_rows(args, deadline: float, work: Path) -> list[Row]:
    env = dict(os.environ)
    if args.dry_run:
        env["DS_ACCELERATOR"] = "cpu"
    t0 = time.monotonic()
    workers = 0 if args.dry_run else max(1, min(8, (os.cpu_count() or 2) - 1))
    shards = Path(args.shards) if args.shards else build_demo_shards(work, args.demo_cases, env, workers)
    built_s = time.monotonic() - t0
    out = work / "run"
    cmd = train_command(args, shards, out)
    remaining = max(30.0, deadline - time.monotonic())
    t0 = time.monotonic()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=remaining, cwd=REPO)
    wall = time.monotonic() - t0
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        return [Row("zero2", " ".join(cmd[:3]), {"notes": " / ".join(tail)[:300]}, status="FAIL")]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [m for m in metrics if m.get("kind", "train") == "train" and "loss" in m]
    sps = [m["samples_per_s"] for m in train if "samples_per_s" in m]
    tail = sps[len(sps) // 2 :] or sps  # second half: past DeepSpeed / compile warm-up
    notes = (
        f"{train[-1]['step']} steps, loss {train[0]['loss']:.3f} -> {train[-1]['loss']:.3f}, "
        f"wall {wall:.0f}s (shards built in {built_s:.0f}s)"
    )
    values = {"samples_per_s": sum(tail) / len(tail) if tail else None, "notes": notes}
    return [Row("zero2", f"{args.train_model} demo shards, ZeRO-2 {args.zero2_steps} steps", values)]


def train_command(args, shards: Path, out: Path) -> list[str]:
    """``deepspeed trainer/train.py`` (python on the CPU dry run) with dotted config overrides."""
    overrides = [
        f"model.name={args.train_model}",
        f"train.steps={args.zero2_steps}",
        "train.deepspeed=configs/deepspeed/zero2.json",
        "train.val_every=0",  # validate / checkpoint once at the end only: this times training steps
        "train.ckpt_every=0",
        "train.progress_bar=false",
    ]
    script = str(REPO / "trainer/train.py")
    base = ["--config", str(REPO / args.train_config), "--shards", str(shards), "--output", str(out), *overrides]
    if args.dry_run:
        return [sys.executable, script, *base]
    return [shutil.which("deepspeed") or "deepspeed", "--num_gpus", "1", script, *base]


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model and grid, few steps: checks the wiring")
    p.add_argument("--model", default=None, help="model config for the encoder sections (default base; dry run tiny)")
    p.add_argument("--grid", default=None, help="volume Z,Y,X in voxels (default 64,512,512; dry run 16,64,64)")
    p.add_argument("--max-micro-batch", type=int, default=None, help="largest micro-batch tried (default 128; dry run 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per size (default 2; dry run 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per size, incl. compile (default 1)")
    p.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS, help="MFU denominator (dense bf16)")
    p.add_argument("--sections", default="env,encoder,reference,zero2", help="comma list of sections to run")
    p.add_argument("--shards", default=None, help="existing shard dir for the ZeRO-2 run (default: build demo shards)")
    p.add_argument("--demo-cases", type=int, default=None, help="cases of demo data to build (default 16; dry run 4)")
    p.add_argument("--train-config", default="configs/train/demo.yaml")
    p.add_argument("--train-model", default=None, help="model for the ZeRO-2 run (default base; dry run tiny)")
    p.add_argument("--zero2-steps", type=int, default=None, help="default 50; dry run 2")
    p.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget; later sections are skipped")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    p.add_argument(
        "--flops-only",
        action="store_true",
        help="print the analytic FLOP count of --model at --grid (and samples/s per GPU at 25/40%% MFU) and exit; no GPU needed",
    )
    args = p.parse_args(argv)
    dry = args.dry_run
    args.model = args.model or ("tiny" if dry else "base")
    args.grid = tuple(int(v) for v in (args.grid or ("16,64,64" if dry else "64,512,512")).split(","))
    args.max_micro_batch = args.max_micro_batch or (2 if dry else 128)
    args.steps = args.steps or (1 if dry else 2)
    args.warmup = args.warmup or 1
    args.demo_cases = args.demo_cases or (4 if dry else 16)
    args.train_model = args.train_model or ("tiny" if dry else "base")
    args.zero2_steps = args.zero2_steps or (2 if dry else 50)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(args.sections) - {"env", "encoder", "reference", "zero2"}
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; valid: env, encoder, reference, zero2")
    return args


def run(args, rows: list[Row]) -> list[Row]:
    """Run the selected sections, appending to ``rows`` (so an interrupt keeps what was measured)."""
    import torch

    start = time.monotonic()
    deadline = start + args.budget_s
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        rows.append(Row("env", "device", {"notes": "no CUDA device: use --dry-run for the CPU wiring check"}, "FAIL"))
        return rows
    setup = EncoderSetup(
        model_name=args.model,
        grid_zyx=args.grid,
        device="cuda" if cuda else "cpu",
        amp_dtype="bf16" if cuda else "fp32",
        steps=args.steps,
        warmup=args.warmup,
        overrides={},
    )
    sizes = [2**i for i in range(int(math.log2(args.max_micro_batch)) + 1)]
    # On CPU FlexAttention has no backward: the dry run drives the same code with the exact
    # memory-bounded CPU kernel in its place.
    fast_kernel = "flex" if cuda else "blocked"
    largest = None

    def section(name, fn):
        t0 = time.monotonic()
        if time.monotonic() > deadline:
            rows.append(Row(name, "-", {"notes": "skipped: time budget"}, "skip"))
            return None
        try:
            return fn()
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            rows.append(Row(name, "-", {"notes": f"{type(exc).__name__}: {exc}"[:300]}, "FAIL"))
            return None
        finally:
            print(f"[gpu_check] {name}: {time.monotonic() - t0:.1f}s", file=sys.stderr, flush=True)

    if "env" in args.sections:
        section("env", lambda: rows.extend(environment_report()))
    # Each section gets a share of the budget so that a long sweep cannot starve the ZeRO-2 run.
    encoder_deadline = start + 0.5 * args.budget_s
    reference_deadline = start + 0.65 * args.budget_s
    if "encoder" in args.sections:
        out = section(
            "encoder",
            lambda: encoder_rows(setup, fast_kernel, sizes, args.peak_tflops if cuda else 0, encoder_deadline, "encoder"),
        )
        if out:
            rows.extend(out[0])
            largest = out[1]
            note = f"{out[2] / 1e12:.4g} TFLOP; MFU vs {args.peak_tflops:.0f} TFLOP/s (bf16 dense)"
            if out[3]:
                note += "; grad checkpointing on: hardware does +1 forward (4/3 x these FLOPs)"
            rows.append(Row("encoder", "FLOPs/sample (fwd+bwd, model)", {"notes": note}))
    if "reference" in args.sections:
        # Largest size that fitted with the fast kernel, then halve until the reference kernel fits.
        ref_sizes = [s for s in reversed(sizes) if largest is None or s <= largest]

        def reference():
            for bs in ref_sizes:
                if time.monotonic() > reference_deadline:
                    rows.append(Row("reference", f"mb={bs}", {"notes": "skipped: time budget"}, "skip"))
                    return
                got, fitted, *_ = encoder_rows(
                    setup, "reference", [bs], args.peak_tflops if cuda else 0, reference_deadline, "reference"
                )
                rows.extend(got)
                if fitted is not None:
                    return

        section("reference", reference)
    if "zero2" in args.sections:
        section("zero2", lambda: rows.extend(zero2_rows(args, deadline)))
    rows.append(Row("total", "wall clock", {"notes": f"{time.monotonic() - start:.0f}s (budget {args.budget_s:.0f}s)"}))
    return rows


def flops_report(model: str, grid_zyx: tuple[int, int, int], peak_tflops: float) -> str:
    """FLOP terms of one training sample and what they mean per GPU (capacity planning)."""
    from ctprep_train.model import get_model_config

    cfg = get_model_config(model)
    terms = encoder_flops(cfg.vision, grid_zyx, cfg.vision.anatomy.max_regions + 1)
    fwd = sum(terms.values())
    train = train_flops_per_sample(terms)
    tokens = math.prod(g // p for g, p in zip(grid_zyx, cfg.vision.patch.patch_size)) + 1
    lines = [
        f"{model} at {'x'.join(map(str, grid_zyx))} ({tokens} tokens): forward {fwd / 1e12:.2f} TFLOP, "
        f"train (fwd + bwd) {train / 1e12:.2f} TFLOP per sample, attention QK+AV {(terms['attn_qk'] + terms['attn_av']) / fwd:.0%}",
        "  " + ", ".join(f"{k} {v / 1e12:.3f}" for k, v in terms.items()),
    ]
    for mfu in (0.25, 0.40):
        lines.append(f"  at {mfu:.0%} MFU of {peak_tflops:.0f} TFLOP/s: {peak_tflops * 1e12 * mfu / train:.2f} samples/s per GPU")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.flops_only:
        print(flops_report(args.model, args.grid, args.peak_tflops))
        return 0
    rows: list[Row] = []
    try:
        run(args, rows)
    except KeyboardInterrupt:  # the shell wrapper's timeout sends SIGINT: still print the table
        rows.append(Row("total", "interrupted", {"notes": "outer timeout or Ctrl-C"}, "FAIL"))
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in rows], indent=1, default=str))
    return 1 if any(r.status == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
