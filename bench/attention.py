"""Benchmark SliceAwareAttention kernels: time and peak memory, forward + backward.

CPU section (always): the ``augmented`` kernel (bias as extra head channels, plain flash SDPA;
what ``auto`` picks on CPU) and the memory-bounded ``blocked`` kernel vs the materialized-bias
``reference`` (test oracle) vs plain SDPA without any bias, at growing N. Every
(kernel, N) runs in a fresh subprocess and its peak memory is the growth of the process's
max RSS (``resource.getrusage``) over the baseline taken after the inputs exist: robust,
allocator-agnostic, and it sees torch's native allocations (tracemalloc does not).

GPU section (when CUDA is present): bf16, N = 16,385 (64 x 512 x 512 with 4x16x16 patches),
width 768 / 12 heads: compiled FlexAttention with the slice-bias ``score_mod`` and the
``augmented`` kernel vs SDPA without bias, tokens/s and ``torch.cuda.max_memory_allocated``; plus
a correctness check of the flex and augmented kernels (output and all gradients, including the
bias table's) against the reference.

Usage:
    OMP_NUM_THREADS=1 python bench/attention.py                 # CPU table (+ GPU if present)
    python bench/attention.py --layers 2 4 8 --reference-max-n 3000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ctprep_train.model.patch_embed import token_z_index  # noqa: E402
from ctprep_train.model.slice_attention import (  # noqa: E402
    augmented_slice_attention, blocked_slice_attention, flex_available, flex_slice_attention,
    reference_slice_attention,
)

CPU_KERNELS = ("augmented", "blocked", "reference", "sdpa")


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _run(kernel: str, q, k, v, table, z, block_size: int):
    if kernel == "augmented":
        return augmented_slice_attention(q, k, v, table, z)
    if kernel == "blocked":
        return blocked_slice_attention(q, k, v, table, z, block_size)
    if kernel == "reference":
        return reference_slice_attention(q, k, v, table, z)
    if kernel == "flex":
        return flex_slice_attention(q, k, v, table, z)
    if kernel == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    raise ValueError(f"unknown kernel {kernel!r}")


def _inputs(grid, heads, head_dim, max_distance, device="cpu", dtype=torch.float32, seed=0, batch=1):
    g = torch.Generator(device=device).manual_seed(seed)
    z = token_z_index(grid, device=device)
    n = z.numel()
    q, k, v = (torch.randn(batch, heads, n, head_dim, generator=g, device=device, dtype=dtype).requires_grad_()
               for _ in range(3))
    table = (0.5 * torch.randn(heads, max_distance + 1, generator=g, device=device)).requires_grad_()
    return q, k, v, table, z


def cpu_worker(spec: dict) -> dict:
    """One (kernel, N) measurement in this (fresh) process."""
    # Warm up the code path at a tiny size first so one-off allocations (thread pools, BLAS
    # buffers, autograd engine) are in the baseline, not in the kernel's peak.
    small = _inputs((1, 2, 2), spec["heads"], spec["head_dim"], spec["max_distance"])
    _run(spec["kernel"], *small, spec["block_size"]).backward(torch.randn_like(small[0]))
    del small
    q, k, v, table, z = _inputs(tuple(spec["grid"]), spec["heads"], spec["head_dim"], spec["max_distance"],
                                batch=spec.get("batch", 1))
    grad_out = torch.randn_like(q)
    base = _maxrss_mb()
    times = []
    for _ in range(spec["reps"] + 1):  # first run is warm-up
        t0 = time.perf_counter()
        out = _run(spec["kernel"], q, k, v, table, z, spec["block_size"])
        out.backward(grad_out)
        times.append(time.perf_counter() - t0)
        del out
        q.grad = k.grad = v.grad = table.grad = None
    return {"n": z.numel(), "kernel": spec["kernel"], "seconds": statistics.median(times[1:]),
            "peak_mb": _maxrss_mb() - base}


def run_cpu(args) -> list[dict]:
    rows = []
    for layers in args.layers:
        grid = (layers, args.hw, args.hw)
        n = layers * args.hw * args.hw + 1
        for kernel in CPU_KERNELS:
            if kernel == "reference" and n > args.reference_max_n:
                continue
            spec = dict(kernel=kernel, grid=grid, heads=args.heads, head_dim=args.head_dim, batch=args.batch,
                        max_distance=args.max_distance, block_size=args.block_size, reps=args.reps)
            proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"[{kernel} N={n}] failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"  measured {kernel:9s} N={n:6d}: {rows[-1]['seconds']:.3f} s, +{rows[-1]['peak_mb']:.0f} MB",
                  file=sys.stderr, flush=True)
    return rows


def print_cpu_table(rows: list[dict], args) -> None:
    print(f"\nCPU, fp32, forward+backward, B={args.batch}, heads={args.heads}, head_dim={args.head_dim}, "
          f"block_size={args.block_size}, threads={torch.get_num_threads()}")
    print("peak = growth of max RSS over the baseline with inputs allocated (fresh process per row)\n")
    print(f"| {'N tokens':>8} | {'kernel':9} | {'time s':>8} | {'peak MB':>8} | {'MB per 1k tok':>13} "
          f"| {'mem / ref':>9} | {'time / ref':>10} |")
    print("|" + "|".join("-" * w for w in (10, 11, 10, 10, 15, 11, 12)) + "|")
    by_n: dict[int, dict[str, dict]] = {}
    for r in rows:
        by_n.setdefault(r["n"], {})[r["kernel"]] = r
    for n in sorted(by_n):
        ref = by_n[n].get("reference")
        for kernel in CPU_KERNELS:
            r = by_n[n].get(kernel)
            if r is None:
                continue
            mem_ratio = f"{r['peak_mb'] / ref['peak_mb']:.3f}" if ref and ref["peak_mb"] > 0 else "-"
            time_ratio = f"{r['seconds'] / ref['seconds']:.2f}" if ref else "-"
            print(f"| {n:8d} | {kernel:9} | {r['seconds']:8.3f} | {r['peak_mb']:8.0f} | "
                  f"{1000 * r['peak_mb'] / n:13.1f} | {mem_ratio:>9} | {time_ratio:>10} |")
    blocked = sorted((r for r in rows if r["kernel"] == "blocked"), key=lambda r: r["n"])
    refs = sorted((r for r in rows if r["kernel"] == "reference"), key=lambda r: r["n"])
    for name in ("augmented", "blocked"):
        mine = sorted((r for r in rows if r["kernel"] == name), key=lambda r: r["n"])
        if len(mine) >= 2:
            lo, hi = mine[0], mine[-1]
            growth = (hi["peak_mb"] / max(lo["peak_mb"], 1e-9)) / (hi["n"] / lo["n"])
            print(f"\n{name}: N x{hi['n'] / lo['n']:.1f} -> peak x{hi['peak_mb'] / max(lo['peak_mb'], 1e-9):.1f} "
                  f"(memory growth / N growth = {growth:.2f}; 1.0 = linear, N x{hi['n'] / lo['n']:.0f} for quadratic)")
    if refs:
        n = refs[-1]["n"]
        b = next((r for r in blocked if r["n"] == n), None)
        if b:
            ratio = b["peak_mb"] / refs[-1]["peak_mb"] if refs[-1]["peak_mb"] > 0 else float("nan")
            print(f"largest N where reference ran: {n}: blocked uses {ratio:.3f} "
                  f"of the reference's memory (target <= 0.333)")


def run_gpu(args) -> None:
    if not torch.cuda.is_available():
        print("\nGPU section skipped: CUDA not available")
        return
    if not flex_available():
        print("\nGPU section skipped: this torch has no FlexAttention")
        return
    dev = torch.device("cuda")
    print(f"\nGPU: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}")
    # Correctness first: compiled flex == reference, output and every gradient (fp32, small N).
    q, k, v, table, z = _inputs((4, 16, 16), 4, 64, args.max_distance, device=dev)
    g = torch.randn_like(q)
    ref = reference_slice_attention(q, k, v, table, z)
    ref_grads = torch.autograd.grad(ref, (q, k, v, table), g)
    out = flex_slice_attention(q, k, v, table, z)
    grads = torch.autograd.grad(out, (q, k, v, table), g)
    errs = [(out - ref).abs().max().item()] + [(a - b).abs().max().item() for a, b in zip(grads, ref_grads)]
    print("flex vs reference max abs error (out, dq, dk, dv, dtable), fp32, N=1025: "
          + ", ".join(f"{e:.2e}" for e in errs))
    out = augmented_slice_attention(q, k, v, table, z)
    grads = torch.autograd.grad(out, (q, k, v, table), g)
    errs = [(out - ref).abs().max().item()] + [(a - b).abs().max().item() for a, b in zip(grads, ref_grads)]
    print("augmented vs reference max abs error (out, dq, dk, dv, dtable), fp32, N=1025: "
          + ", ".join(f"{e:.2e}" for e in errs))
    heads, head_dim = args.gpu_heads, args.gpu_width // args.gpu_heads
    grid = (16, 32, 32)  # 64 x 512 x 512 / (4, 16, 16)
    print(f"\nbf16, B=1, N={16 * 32 * 32 + 1}, width {args.gpu_width}, {heads} heads, forward+backward")
    print(f"| {'kernel':24} | {'ms / iter':>9} | {'tokens/s':>10} | {'peak GiB':>8} |")
    print("|" + "|".join("-" * w for w in (26, 11, 12, 10)) + "|")
    for kernel in ("flex", "augmented", "sdpa"):
        q, k, v, table, z = _inputs(grid, heads, head_dim, args.max_distance, device=dev, dtype=torch.bfloat16)
        grad_out = torch.randn_like(q)
        for _ in range(3):  # compile + warm-up
            _run(kernel, q, k, v, table, z, 0).backward(grad_out)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(args.gpu_iters):
            _run(kernel, q, k, v, table, z, 0).backward(grad_out)
        torch.cuda.synchronize()
        ms = 1000 * (time.perf_counter() - start) / args.gpu_iters
        peak = torch.cuda.max_memory_allocated() / 2**30
        name = {"flex": "flex + slice bias", "augmented": "augmented + slice bias"}.get(kernel, "SDPA, no bias")
        print(f"| {name:24} | {ms:9.2f} | {q.shape[2] / ms * 1000:10.0f} | {peak:8.2f} |")
        del q, k, v, table, grad_out
        torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64],
                   help="patch layers (z) per run; N = layers * hw * hw + 1")
    p.add_argument("--hw", type=int, default=16, help="patches per y and x (16 x 16 = one 256 x 256 slice)")
    p.add_argument("--batch", type=int, default=1, help="samples per call (the demo trains 16 x 513 tokens)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--max-distance", type=int, default=64, help="slice-bias table length (patch layers)")
    p.add_argument("--block-size", type=int, default=256, help="query block of the blocked kernel")
    p.add_argument("--reps", type=int, default=2, help="timed repetitions after one warm-up")
    p.add_argument("--reference-max-n", type=int, default=4200,
                   help="largest N for the reference (its (H, N, N) bias and N^2 backward grow fast)")
    p.add_argument("--gpu-width", type=int, default=768)
    p.add_argument("--gpu-heads", type=int, default=12)
    p.add_argument("--gpu-iters", type=int, default=10)
    p.add_argument("--skip-cpu", action="store_true")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(cpu_worker(json.loads(args.worker))))
        return
    if not args.skip_cpu:
        print_cpu_table(run_cpu(args), args)
    run_gpu(args)


if __name__ == "__main__":
    main()
