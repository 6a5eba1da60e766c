"""bench/gpu_check.py: its FLOP count, its micro-batch sweep, and its --dry-run wiring on CPU."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.bench_helpers import load_bench

REPO = Path(__file__).resolve().parents[1]


gpu_check = load_bench("gpu_check")


def vit_b_like(region_attention: bool):
    return SimpleNamespace(
        width=768,
        depth=12,
        num_heads=12,
        mlp_ratio=4.0,
        out_indices=(3, 7),
        num_evidence_tokens=32,
        patch=SimpleNamespace(patch_size=(4, 16, 16), in_chans=1),
        attention=SimpleNamespace(region_attention=region_attention),
        anatomy=SimpleNamespace(enabled=region_attention, max_regions=16, cnn_channels=(16, 32), mask_stride=(1, 4, 4)),
    )


def test_flops_of_a_vit_b_at_16385_tokens_by_hand():
    terms = gpu_check.encoder_flops(vit_b_like(False), (64, 512, 512), num_regions=17)
    n, d, layers = 16385, 768, 12
    # Hand count: per block 24 N D^2 (qkv 6, out 2, MLP 16) + 4 N^2 D (QK^T and AV).
    per_block = 24 * n * d * d + 4 * n * n * d
    patch_embed = 2 * 16384 * d * (4 * 16 * 16)
    fuse = 2 * n * 3 * d * d  # blocks 3, 7 and the last one, concatenated -> width
    body = sum(v for k, v in terms.items() if k != "heads")
    assert body == pytest.approx(layers * per_block + patch_embed + fuse, rel=1e-12)
    assert terms["heads"] / sum(terms.values()) < 0.01
    # At 16k tokens attention dominates: the N^2 terms are most of the work.
    assert (terms["attn_qk"] + terms["attn_av"]) / sum(terms.values()) > 0.6
    assert gpu_check.train_flops_per_sample(terms) == pytest.approx(3 * sum(terms.values()))
    assert "region_xattn" in gpu_check.encoder_flops(vit_b_like(True), (64, 512, 512), num_regions=17)


@pytest.mark.parametrize("model, grid", [("tiny", (32, 128, 128)), ("base", (16, 64, 128))])
def test_flop_count_matches_torch_flop_counter(model, grid):
    """The analytic count against FlopCounterMode on a real forward (blocked kernel: plain matmuls)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ctprep_train.model import VisionEncoder3D, get_model_config

    torch.manual_seed(0)
    cfg = get_model_config(model, **{"vision.attention.kernel": "blocked"})
    visual = VisionEncoder3D(cfg.vision, cfg.embed_dim)
    batch = gpu_check.synthetic_batch(cfg.vision, grid, 1, "cpu")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        visual(batch["image"], batch["mask"], batch["regions"])
    analytic = sum(gpu_check.encoder_flops(cfg.vision, grid, cfg.vision.anatomy.max_regions + 1).values())
    assert analytic == pytest.approx(counter.get_total_flops(), rel=0.01)


def test_sweep_stops_at_the_first_micro_batch_that_does_not_fit():
    tried = []

    def measure(bs):
        tried.append(bs)
        if bs >= 8:
            raise gpu_check.OutOfMemory("CUDA out of memory. Tried to allocate 20 GiB")
        return {"samples_per_s": float(bs)}

    results, largest = gpu_check.sweep_micro_batches(measure, [1, 2, 4, 8, 16, 32], deadline=float("inf"))
    assert tried == [1, 2, 4, 8]
    assert largest == 4
    assert results[-1][0] == 8 and results[-1][1].startswith("OOM")


def test_an_out_of_memory_step_ends_the_sweep_and_is_reported(monkeypatch):
    """The real measuring path on CPU, with an allocator failure injected at micro-batch 2."""
    import torch

    real_loss = gpu_check.encoder_loss

    def loss_or_oom(visual, batch):
        if batch["image"].shape[0] >= 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 24.00 GiB")
        return real_loss(visual, batch)

    monkeypatch.setattr(gpu_check, "encoder_loss", loss_or_oom)
    setup = gpu_check.EncoderSetup("tiny", (16, 64, 64), "cpu", "fp32", steps=1, warmup=0, overrides={})
    rows, largest, per_sample, _ = gpu_check.encoder_rows(setup, "blocked", [1, 2, 4], 0, float("inf"), "encoder")
    assert largest == 1 and per_sample > 0
    assert [r.status for r in rows] == ["ok", "OOM"]
    assert "Tried to allocate" in rows[1].values["notes"]


def test_sweep_respects_the_time_budget():
    results, largest = gpu_check.sweep_micro_batches(lambda bs: {}, [1, 2], deadline=0.0)
    assert largest is None and results == [(1, "skipped: time budget")]


def test_table_has_one_line_per_row_and_formats_missing_values():
    rows = [
        gpu_check.Row("encoder", "base mb=1", {"samples_per_s": 3.21, "tflops": 400.0, "mfu": 0.4045, "peak_gib": 30.5}),
        gpu_check.Row("encoder", "base mb=2", {"notes": "OOM"}, status="OOM"),
    ]
    table = gpu_check.format_table(rows).splitlines()
    assert len(table) == 2 + len(rows)
    assert "40.5%" in table[2] and "30.5" in table[2]
    assert "| -" in table[3]


def test_defaults_are_the_issue_targets_and_dry_run_is_tiny():
    full = gpu_check.parse_args([])
    assert full.model == "base" and full.grid == (64, 512, 512) and full.zero2_steps == 50
    assert full.peak_tflops == pytest.approx(989.0)
    dry = gpu_check.parse_args(["--dry-run"])
    assert dry.model == "tiny" and max(dry.grid) <= 64 and dry.zero2_steps <= 5
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--sections", "env,warp"])


def test_without_a_gpu_the_full_check_says_so_instead_of_running_on_cpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the real check runs there")
    rows = gpu_check.run(gpu_check.parse_args([]), [])
    assert rows[-1].status == "FAIL" and "--dry-run" in rows[-1].values["notes"]


def test_dry_run_runs_every_section_on_cpu(tmp_path):
    """The whole script at tiny size: env, encoder sweep, reference kernel, a DeepSpeed ZeRO-2 run."""
    out = tmp_path / "rows.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    res = subprocess.run(
        ["bash", str(REPO / "bench/gpu_check.sh"), "--dry-run", "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    import json

    rows = json.loads(out.read_text())
    sections = {r["section"] for r in rows if r["status"] == "ok"}
    assert {"env", "encoder", "reference", "zero2", "total"} <= sections, res.stdout
    encoder = [r for r in rows if r["section"] == "encoder" and r["values"].get("samples_per_s")]
    assert len(encoder) == 2  # micro-batch 1 and 2
    zero2 = next(r for r in rows if r["section"] == "zero2")
    assert "steps" in zero2["values"]["notes"]
    assert "| section" in res.stdout  # one table on stdout


def test_flops_only_report_for_capacity_planning(capsys):
    assert gpu_check.main(["--flops-only", "--model", "base", "--grid", "64,512,512"]) == 0
    out = capsys.readouterr().out
    assert "16385 tokens" in out and "39.85 TFLOP per sample" in out and "samples/s per GPU" in out
