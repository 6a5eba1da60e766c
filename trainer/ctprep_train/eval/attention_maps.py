"""Attention maps out of a ``CTCLIP`` for pictures and CoT alignment, without touching the model code.

The model computes attention inside fused kernels (blocked / FlexAttention) and never
materialises it, so the maps are *recomputed* here from what forward hooks capture:

* **CLS attention** (last block): the hook on that block's ``SliceAwareAttention`` keeps its
  input tokens; the CLS query's softmax over all keys is recomputed with the module's own
  ``qkv`` weights and slice-bias table (same formula as its reference kernel), averaged over
  heads, restricted to patch keys and renormalised.
* **Region attention** (last block): the L2 norm, per patch, of the ``RegionAwareAttention``
  branch's output: where region embeddings inject the most into the tokens.
* **CoT step attention**: the step head pools K evidence tokens, each a softmax over patches
  (``evidence_attn`` (B, K, P) from ``CTCLIP.forward``). A step attends over evidence tokens
  with ``softmax(step_pool_scale * step . evidence_k)`` (the step-alignment loss's pooling,
  ``ctprep_train.losses.LossConfig.step_pool_scale``); its patch map is the mixture
  ``sum_k w_k * evidence_attn[k]`` (rows sum to 1): ``ctprep_train.losses.step_patch_attention``, the
  map the grounding term (``LossConfig.step_grounding``) trains.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ctprep_train.losses import step_patch_attention
from ctprep_train.model.region_attention import RegionAwareAttention
from ctprep_train.model.slice_attention import SliceAwareAttention, slice_distance_index


def _slice_modules(model: torch.nn.Module) -> list[SliceAwareAttention]:
    return [m for m in model.modules() if isinstance(m, SliceAwareAttention)]


def slice_bias_tables(model: torch.nn.Module) -> list[np.ndarray]:
    """Per layer (in block order), the learned bias (num_heads, max_slice_distance); the CLS column
    (last entry of the table) is dropped. Empty when the slice bias is switched off."""
    out = []
    for m in _slice_modules(model):
        if m.slice_bias_table is not None:
            out.append(m.slice_bias_table.detach().float().cpu().numpy()[:, :-1])
    return out


def _default_step_pool_scale() -> float:
    from ctprep_train.losses import LossConfig

    return float(LossConfig().step_pool_scale)


class AttentionRecorder:
    """Hooks on the last block; ``run(batch)`` returns the maps of the first case of ``batch``."""

    def __init__(self, model: torch.nn.Module, step_pool_scale: float | None = None):
        self.model = model
        self.step_pool_scale = _default_step_pool_scale() if step_pool_scale is None else step_pool_scale
        slices = _slice_modules(model)
        if not slices:
            raise NotImplementedError("the model has no SliceAwareAttention module to read CLS attention from")
        self.last_self_attn = slices[-1]
        regions = [m for m in model.modules() if isinstance(m, RegionAwareAttention)]
        self.last_region_attn = regions[-1] if regions else None
        self._captured: dict[str, Any] = {}
        self._handles = [self.last_self_attn.register_forward_pre_hook(self._keep_self_input)]
        if self.last_region_attn is not None:
            self._handles.append(self.last_region_attn.register_forward_hook(self._keep_region_output))

    def _keep_self_input(self, module, args):
        self._captured["x"], self._captured["z_index"] = args[0].detach(), args[1].detach()

    def _keep_region_output(self, module, args, output):
        self._captured["region_out"] = output.detach()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @torch.no_grad()
    def cls_attention(self) -> np.ndarray:
        """(P,) last-block CLS attention over patch tokens, head-averaged, sums to 1."""
        m = self.last_self_attn
        x, z = self._captured["x"][:1], self._captured["z_index"]
        n = x.shape[1]
        qkv = m.qkv(x).reshape(1, n, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4)
        q, k = qkv[0][:, :, :1].float(), qkv[1].float()  # CLS query (1, H, 1, Dh); keys (1, H, N, Dh)
        scores = torch.matmul(q, k.transpose(-1, -2)) * m.scale  # (1, H, 1, N)
        if m.slice_bias_table is not None:
            table = m.slice_bias_table.float()
            idx = slice_distance_index(z[:1], z, table.shape[1] - 1)  # (1, N)
            scores = scores + table[:, idx].unsqueeze(0)
        attn = torch.softmax(scores, dim=-1)[0, :, 0, 1:].mean(0)  # patches only
        return (attn / attn.sum()).cpu().numpy()

    @torch.no_grad()
    def run(self, batch: dict[str, Any], need: tuple[str, ...] = ("cls", "region", "steps")) -> dict[str, Any]:
        """Maps for case 0 of ``batch``: grid, patch_size, cls (P,), region (P,) or None, steps (S, P) or None."""
        self._captured.clear()
        out = self.model(batch)
        visual = self.model.visual
        patch = tuple(int(p) for p in visual.patch_size)
        shape = tuple(batch["image"].shape[-3:])
        grid = tuple(s // p for s, p in zip(shape, patch))
        maps: dict[str, Any] = {"grid": grid, "patch_size": patch, "region": None, "steps": None}
        if "cls" in need:
            maps["cls"] = self.cls_attention()
        if "region" in need and "region_out" in self._captured:
            maps["region"] = self._captured["region_out"][0, 1:].float().norm(dim=-1).cpu().numpy()
        if "steps" in need and "step_embed" in out and "evidence_attn" in out:
            valid = out["step_valid"][0]
            steps = out["step_embed"][0][valid].float()  # (S, E)
            if steps.shape[0]:
                maps["steps"] = step_patch_attention(steps[None], out["step_evidence"][:1].float(),
                                                     out["evidence_attn"][:1].float(),
                                                     self.step_pool_scale)[0].cpu().numpy()  # (S, P)
        return maps
