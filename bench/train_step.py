"""One vision-encoder training step (forward + backward) per slice-attention kernel, at the demo's shape.

The same encoder (same seed, so the same weights) is built once per kernel; the kernels are then
timed in turn, rep by rep, in this one process, so machine noise hits them alike. Prints the
median seconds per step, the ratio to ``--baseline`` and the first step's loss (the kernels compute
the same function, so the losses must agree; a mismatch is reported and fails the run).

    OMP_NUM_THREADS=1 python -m bench.train_step          # tiny, batch 16 x 32 x 128 x 128, bf16
    python bench/train_step.py --amp fp32 --reps 3 --kernels augmented blocked   # as a script works too

The text tower is not built: `make demo` freezes it and caches its features, so the vision encoder
is what a demo step spends its time on.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

if not __package__:  # run as a file (python bench/train_step.py): Python put bench/, not the repository, on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_check import EncoderSetup, build_visual, encoder_loss, synthetic_batch  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--grid", type=int, nargs=3, default=[32, 128, 128], help="voxels z y x (demo grid)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--kernels", nargs="+", default=["augmented", "blocked"])
    p.add_argument("--baseline", default="blocked", help="kernel the ratios are taken against")
    p.add_argument("--amp", choices=["bf16", "fp32"], default="bf16", help="bf16 = the DeepSpeed configs' autocast")
    p.add_argument("--reps", type=int, default=5, help="timed steps per kernel after one warm-up step")
    a = p.parse_args(argv)
    if a.baseline not in a.kernels:
        p.error(f"--baseline {a.baseline!r} must be one of --kernels {a.kernels}")

    setup = EncoderSetup(a.model, tuple(a.grid), "cpu", a.amp, a.reps, 1, {})
    models = {}
    for kernel in a.kernels:
        torch.manual_seed(0)
        models[kernel], cfg = build_visual(setup, kernel)
    batch = synthetic_batch(cfg.vision, tuple(a.grid), a.batch, "cpu")

    def step(kernel: str) -> tuple[float, float]:
        amp = torch.autocast("cpu", dtype=torch.bfloat16) if a.amp == "bf16" else contextlib.nullcontext()
        t0 = time.perf_counter()
        with amp:
            loss = encoder_loss(models[kernel], batch)
        loss.backward()
        models[kernel].zero_grad(set_to_none=True)
        return time.perf_counter() - t0, float(loss)

    first_loss = {k: step(k)[1] for k in a.kernels}  # warm-up
    times: dict[str, list[float]] = {k: [] for k in a.kernels}
    for _ in range(a.reps):
        for kernel in a.kernels:
            times[kernel].append(step(kernel)[0])

    base = statistics.median(times[a.baseline])
    rows = [{"kernel": k, "median_s": statistics.median(v), "ratio": statistics.median(v) / base,
             "loss": first_loss[k]} for k, v in times.items()]
    print(f"\n{a.model}, batch {a.batch} x {'x'.join(map(str, a.grid))} voxels, {a.amp}, "
          f"{torch.get_num_threads()} threads, median of {a.reps} steps (forward + backward)")
    print(f"| kernel | s / step | time / {a.baseline} | loss at step 1 |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r['median_s']:.3f} | {r['ratio']:.2f} | {r['loss']:.6f} |")
    tol = 1e-4 if a.amp == "fp32" else 2e-2
    ref = first_loss[a.baseline]
    bad = [k for k, v in first_loss.items() if abs(v - ref) > tol * max(1.0, abs(ref))]
    if bad:
        raise SystemExit(f"kernels {bad} give a different loss than {a.baseline} (tolerance {tol}): not the same function")
    return rows


if __name__ == "__main__":
    main()
