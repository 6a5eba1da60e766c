"""Test-only stand-ins and launch helpers for the trainer tests.

``TinyCLIP`` is a few-thousand-parameter model with the CTCLIP forward contract (image_embed,
text_embed, exp'd logit_scale) so the training loop can be tested in seconds; it is plugged in
through the ``model.module`` / ``loss.factory`` config keys and is never used outside tests.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


class TinyCLIP(nn.Module):
    def __init__(self, dim: int = 16, vocab: int = 64, width: int = 8):
        super().__init__()
        self.config = {"dim": dim, "vocab": vocab, "width": width}
        self.patch = nn.Conv3d(1, width, kernel_size=(4, 8, 8), stride=(4, 8, 8))
        self.pool = nn.AdaptiveAvgPool3d((2, 4, 4))  # keeps where the class blob is
        self.visual_proj = nn.Linear(width * 32, dim)
        self.token = nn.Embedding(vocab, dim)
        self.text_proj = nn.Linear(dim, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        dtype = self.patch.weight.dtype
        x = (batch["image"].to(dtype) / 1000.0).unsqueeze(1)
        feats = self.pool(F.gelu(self.patch(x))).flatten(1)
        image = F.normalize(self.visual_proj(feats), dim=-1)
        ids = batch["report_ids"].clamp(max=self.token.num_embeddings - 1)
        attn = batch["report_attn"].to(dtype).unsqueeze(-1)
        pooled = (self.token(ids) * attn).sum(1) / attn.sum(1).clamp(min=1)
        text = F.normalize(self.text_proj(pooled), dim=-1)
        return {"image_embed": image, "text_embed": text, "logit_scale": self.logit_scale.exp()}

    def no_weight_decay(self) -> set[str]:
        return {"logit_scale"}


def create_model(name: str, **overrides) -> TinyCLIP:
    if name != "stand-in":
        raise ValueError(f"unknown stand-in model {name!r}")
    return TinyCLIP(**overrides)


def save_pretrained(model: TinyCLIP, directory: str) -> Path:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(model.config))
    return directory


def load_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(directory) / "model.safetensors"))


class ClipLoss:
    """Symmetric InfoNCE on the local batch (the stand-in for ctprep_train.losses.MultiTaskLoss)."""

    def __init__(self, cfg: dict):
        self.weight = float(cfg.get("clip", 1.0))

    def __call__(self, outputs: dict, batch: dict):
        logits = outputs["logit_scale"] * outputs["image_embed"] @ outputs["text_embed"].T
        target = torch.arange(logits.shape[0])
        clip = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        return self.weight * clip, {"clip": clip.detach()}


STAND_IN = [
    "model.module=tests.trainer_helpers",
    "model.name=stand-in",
    "loss.factory=tests.trainer_helpers:ClipLoss",
    "data.tokenizer={name: trainer-test-tokenizer, hash: '0000000000000000'}",
    "data.num_workers=0",
    "train.progress_bar=false",
]


def launch(args: list[str], *, nproc: int = 1, timeout: float = 240, launcher: str = "python") -> subprocess.CompletedProcess:
    """Run trainer/train.py in a subprocess (python, or torchrun with ``nproc`` ranks)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               TOKENIZERS_PARALLELISM="false")
    if launcher == "torchrun":
        cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(_free_port()), "trainer/train.py", *args]
    else:
        cmd = [PYTHON, "trainer/train.py", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(run: Path, kind: str = "train") -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r["kind"] == kind]
