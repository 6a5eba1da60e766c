"""CTCLIP: VisionEncoder3D + TextEncoder + learnable temperatures; forward(batch) feeds the losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import CTCLIPConfig
from .text_encoder import TextEncoder
from .vision_encoder import VisionEncoder3D


class CTCLIP(nn.Module):
    """The pretraining model.

    Args:
        cfg: CTCLIPConfig.
        visual, text: prebuilt towers (parts as arguments); built from ``cfg`` when None.
        load_text_weights: passed to TextEncoder (False when weights come from a checkpoint).
    """

    def __init__(self, cfg: CTCLIPConfig, visual: nn.Module | None = None, text: nn.Module | None = None,
                 load_text_weights: bool | None = None):
        super().__init__()
        self.cfg = cfg
        self.visual = visual if visual is not None else VisionEncoder3D(cfg.vision, cfg.embed_dim)
        self.text = text if text is not None else TextEncoder(cfg.text, cfg.embed_dim, load_text_weights)
        init = torch.tensor(float(cfg.init_logit_scale))
        # One temperature per contrastive term: they see different numbers of negatives.
        self.logit_scale = nn.Parameter(init.clone())
        self.local_logit_scale = nn.Parameter(init.clone())
        self.step_logit_scale = nn.Parameter(init.clone())

    def _scale(self, p: nn.Parameter) -> torch.Tensor:
        # reshape(()): the trainer may promote 0-dim parameters to (1,) for DeepSpeed's broadcast.
        return p.exp().clamp(max=self.cfg.max_logit_scale).reshape(())

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        hf = self.text.transformer
        if getattr(hf, "supports_gradient_checkpointing", False):
            # transformers 5 renamed gradient_* to activation_checkpointing_*; 4.x has only the old names.
            prefix = "activation_checkpointing" if hasattr(hf, "activation_checkpointing_enable") else "gradient_checkpointing"
            getattr(hf, f"{prefix}_{'enable' if enable else 'disable'}")()

    def no_weight_decay(self) -> set[str]:
        names = {f"visual.{n}" for n in self.visual.no_weight_decay()}
        return names | {"logit_scale", "local_logit_scale", "step_logit_scale"}

    def _visual(self, batch: dict) -> dict:
        num_regions = batch["region_text_ids"].shape[1] if "region_text_ids" in batch else None
        return self.visual(batch["image"], batch.get("mask"), batch.get("regions"), num_regions)

    def encode_image(self, batch: dict | torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, E) global image embedding; ``batch`` holds image (+ mask, regions) or is the image."""
        if isinstance(batch, torch.Tensor):
            batch = {"image": batch}
        emb = self._visual(batch)["global"]
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_text(self, ids: torch.Tensor, attn: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """ids, attn: (B, L) -> (B, E) report/sentence embedding."""
        emb = self.text(ids, attn)
        return F.normalize(emb, dim=-1) if normalize else emb

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Everything the losses and evaluation need from one batch (see the batch contract in plan).

        Returns (E = embed_dim; all embeddings L2-normalized; invalid rows are zeros):
            image_embed (B, E), text_embed (B, E) (if report_ids), logit_scale (), local_logit_scale (),
            step_logit_scale () (all exp'd and clamped),
            region_embed (B, R, E), region_present (B, R) bool (with mask/regions),
            region_text_embed (B, R, E), region_text_valid (B, R) bool (if region_text_ids),
            step_evidence (B, K, E), evidence_attn (B, K, P),
            step_embed (B, S, E), step_valid (B, S) bool (if steps_ids),
            label_logits (B, num_labels) (if the auxiliary head is on).
        """
        vis = self._visual(batch)
        out = {
            "image_embed": F.normalize(vis["global"], dim=-1),
            "step_evidence": F.normalize(vis["evidence"], dim=-1),
            "evidence_attn": vis["evidence_attn"],
            "logit_scale": self._scale(self.logit_scale),
            "local_logit_scale": self._scale(self.local_logit_scale),
            "step_logit_scale": self._scale(self.step_logit_scale),
        }
        if "local" in vis:
            out["region_embed"] = F.normalize(vis["local"], dim=-1)
            out["region_present"] = vis["region_present"]
        if "label_logits" in vis:
            out["label_logits"] = vis["label_logits"]
        if "report_ids" in batch:
            out["text_embed"] = self.encode_text(batch["report_ids"], batch["report_attn"])
        if "region_text_ids" in batch:
            emb, ok = self.text.encode_grouped(batch["region_text_ids"], batch["region_text_attn"])
            out["region_text_embed"], out["region_text_valid"] = F.normalize(emb, dim=-1), ok
        if "steps_ids" in batch:
            emb, ok = self.text.encode_grouped(batch["steps_ids"], batch["steps_attn"], batch.get("steps_valid"))
            out["step_embed"], out["step_valid"] = F.normalize(emb, dim=-1), ok
        return out
