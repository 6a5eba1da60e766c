"""Pretraining losses: CLIP InfoNCE (gathered across ranks), region-text, CoT step alignment and
grounding, labels.

Every loss takes the ``CTCLIP.forward`` outputs and the batch (``ctprep_train.data.collate_samples`` contract) and
never lets padding leak in: padded steps, regions without text and unknown labels (-1) are
selected out by their masks before any arithmetic, so their values cannot change the loss.
Importable without DeepSpeed (torch.distributed only).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .distributed import all_gather_with_grad, world_info


@dataclass
class LossConfig:
    clip: float = 1.0  # weight: global image <-> report InfoNCE
    region: float = 0.5  # weight: region embedding <-> region sentence contrastive
    step: float = 0.5  # weight: CoT step <-> step-head evidence alignment
    # weight: a CoT step that names a region (step_regions >= 0) puts its evidence attention there.
    # Off by default: the contrastive step term alone leaves that attention uniform (docs/evaluation.md).
    step_grounding: float = 0.0
    labels: float = 0.1  # weight: auxiliary 18-label BCE (0 = off)
    gather_with_grad: bool = True  # gathered features keep gradients (exact full-batch gradient)
    step_pool_scale: float = 10.0  # unitless sharpness of a step's attention over evidence tokens
    label_smoothing: float = 0.0  # InfoNCE label smoothing (0 = none)
    # A report that is token-identical to the positive's (CT-RATE: several reconstructions of one
    # scan share one report, and they sit next to each other in the shards) is not a negative:
    # it is masked out of both directions of the InfoNCE instead of being pushed away.
    dedup_reports: bool = True
    # Likewise for CoT steps: a volume that has a token-identical step ("Right upper lobe: no focal
    # abnormality.") is not a negative for that step; a step every volume shares then adds nothing.
    dedup_steps: bool = True


def _zero(*tensors: torch.Tensor) -> torch.Tensor:
    """A zero loss still attached to the graph (all ranks/engines see the same parameters used)."""
    return sum(t.sum() * 0.0 for t in tensors if t is not None and t.dtype.is_floating_point)


def gather_features(x: torch.Tensor, with_grad: bool = True) -> torch.Tensor:
    """All ranks' ``x`` along dim 0; without grad, only the local slice carries gradient."""
    rank, world = world_info()
    if world == 1:
        return x
    if with_grad:
        return all_gather_with_grad(x)
    parts = [torch.empty_like(x) for _ in range(world)]
    torch.distributed.all_gather(parts, x.detach().contiguous())
    parts[rank] = x
    return torch.cat(parts, dim=0)


_KEY_WEIGHTS: dict[torch.device, torch.Tensor] = {}


def text_keys(ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """(B,) int64 key per token sequence, equal for token-identical texts (padding ignored).

    A fixed random linear hash over positions (same on every rank and run; int64 arithmetic
    wraps): different texts collide with probability ~2^-64, so keys can be gathered across
    ranks instead of the variable-length ids.
    """
    length = ids.shape[-1]
    weights = _KEY_WEIGHTS.get(ids.device)
    if weights is None or weights.shape[0] < length:
        gen = torch.Generator().manual_seed(20260101)
        n = max(length, 4096)
        weights = torch.randint(-(2**62), 2**62, (n,), generator=gen, dtype=torch.int64).to(ids.device)
        _KEY_WEIGHTS[ids.device] = weights
    tokens = (ids.long() + 1) * attn.long()  # padding contributes 0; real token 0 still counts
    return (tokens * weights[:length]).sum(-1)


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
              gather_with_grad: bool = True, label_smoothing: float = 0.0,
              text_key: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE in local-loss form.

    Each rank scores its B local rows against all B x world gathered columns (B x B*world
    logits, not (B*world)^2); the mean of the ranks' losses equals the full-matrix loss.

    Args:
        image, text: (B, E) L2-normalized, the same B on every rank.
        logit_scale: () the exp'd inverse temperature.
        text_key: (B,) int64 (``text_keys``) or None. Columns whose report has the same key as the
            row's report, other than the row's own pair, are dropped from both softmaxes: an
            identical report is not a negative (as in evaluation, where such reports are one text).
    """
    rank, world = world_info()
    all_image = gather_features(image, gather_with_grad)
    all_text = gather_features(text, gather_with_grad)
    target = torch.arange(image.shape[0], device=image.device) + rank * image.shape[0]
    logits_per_image = logit_scale * image @ all_text.T
    logits_per_text = logit_scale * text @ all_image.T
    same = None
    if text_key is not None:
        all_key = gather_features(text_key, with_grad=False) if world > 1 else text_key
        same = text_key[:, None] == all_key[None, :]
        same[torch.arange(same.shape[0], device=same.device), target] = False
        if not bool(same.any()):
            same = None
    return 0.5 * (_masked_cross_entropy(logits_per_image, target, same, label_smoothing)
                  + _masked_cross_entropy(logits_per_text, target, same, label_smoothing))


def _masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, drop: torch.Tensor | None,
                          label_smoothing: float) -> torch.Tensor:
    """``F.cross_entropy`` over the columns not in ``drop`` (B, C) bool; smoothing spreads over
    the kept columns only (a dropped column gets no probability mass, so no -inf term)."""
    if drop is None:
        return F.cross_entropy(logits, target, label_smoothing=label_smoothing)
    logp = torch.log_softmax(logits.masked_fill(drop, float("-inf")), dim=-1)
    nll = -logp.gather(1, target[:, None]).squeeze(1)
    if not label_smoothing:
        return nll.mean()
    uniform = -logp.masked_fill(drop, 0.0).sum(-1) / (~drop).sum(-1)
    return ((1.0 - label_smoothing) * nll + label_smoothing * uniform).mean()


def _same_text(ids: torch.Tensor, attn: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(len(rows), len(cols)) bool: token-identical sentences (padding ignored)."""
    masked = torch.where(attn.bool(), ids.long(), torch.full_like(ids.long(), -1))
    lengths = attn.bool().sum(-1)
    same = (masked[rows][:, None, :] == masked[cols][None, :, :]).all(-1)
    return same & (lengths[rows][:, None] == lengths[cols][None, :])


def region_text_loss(region_embed: torch.Tensor, region_present: torch.Tensor,
                     region_text_embed: torch.Tensor, region_text_valid: torch.Tensor,
                     region_has_text: torch.Tensor, region_text_ids: torch.Tensor,
                     region_text_attn: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Region <-> region-sentence contrastive over all (volume, region) pairs of the local batch.

    Rule (why: "no significant abnormality in the X" sentences are the same text for thousands of
    volumes, so treating them as distinct classes would push identical sentences apart):

    - Anchors (rows) are only pairs with their own finding text (``region_has_text``), a present
      region (non-zero assignment) and a valid sentence. Default "no abnormality" sentences are
      never anchors, hence never contrasted against each other.
    - Candidates (columns) are all valid sentences (image -> text) or all present regions
      (text -> image) of the batch, any region, any volume. A default sentence is a true negative
      for an anchor with a finding, so it stays a negative.
    - Any column whose sentence is token-identical to the anchor's (other than the anchor itself)
      is masked out, so a duplicated finding text is never a false negative.

    Shapes: region_embed, region_text_embed (B, R, E) normalized; the rest (B, R) bool, ids/attn (B, R, L).
    """
    b, r, e = region_embed.shape
    vis, txt = region_embed.reshape(b * r, e), region_text_embed.reshape(b * r, e)
    present, text_ok = region_present.reshape(-1).bool(), region_text_valid.reshape(-1).bool()
    anchors = (region_has_text.reshape(-1).bool() & present & text_ok).nonzero().squeeze(1)
    if anchors.numel() == 0:
        return _zero(region_embed, region_text_embed)
    ids, attn = region_text_ids.reshape(b * r, -1), region_text_attn.reshape(b * r, -1)
    losses = []
    for cols, anchor_feat, col_feat in ((text_ok.nonzero().squeeze(1), vis, txt),
                                        (present.nonzero().squeeze(1), txt, vis)):
        logits = logit_scale * anchor_feat[anchors] @ col_feat[cols].T  # (A, C)
        is_self = anchors[:, None] == cols[None, :]
        duplicate = _same_text(ids, attn, anchors, cols) & text_ok[cols][None, :] & ~is_self
        logits = logits.masked_fill(duplicate, float("-inf"))
        losses.append(F.cross_entropy(logits, is_self.float().argmax(1)))
    return 0.5 * (losses[0] + losses[1])


def step_pool_weights(steps: torch.Tensor, evidence: torch.Tensor, pool_scale: float) -> torch.Tensor:
    """softmax(pool_scale * step . evidence_k) over the K evidence tokens: how a step pools its volume.

    Shapes: steps (..., E), evidence (..., K, E) broadcast over the leading dims -> (..., K).
    """
    return torch.softmax(pool_scale * torch.einsum("...e,...ke->...k", steps, evidence), dim=-1)


def step_patch_attention(step_embed: torch.Tensor, step_evidence: torch.Tensor, evidence_attn: torch.Tensor,
                         pool_scale: float = 10.0) -> torch.Tensor:
    """(B, S, P) where each step looks among its own volume's patches (rows sum to 1).

    The step pools the K evidence tokens (:func:`step_pool_weights`, the step loss's pooling) and each
    evidence token is a softmax over the P patches, so the step's patch map is the mixture
    ``sum_k w_k * evidence_attn[k]``. Evaluation's CoT alignment scores this map; the grounding term
    trains it.

    Shapes: step_embed (B, S, E), step_evidence (B, K, E) normalized; evidence_attn (B, K, P).
    """
    w = step_pool_weights(step_embed, step_evidence[:, None], pool_scale)  # (B, S, K)
    return torch.einsum("bsk,bkp->bsp", w, evidence_attn.to(w.dtype))


def step_grounding_loss(step_embed: torch.Tensor, step_valid: torch.Tensor, step_evidence: torch.Tensor,
                        evidence_attn: torch.Tensor, step_regions: torch.Tensor, regions: torch.Tensor,
                        pool_scale: float = 10.0) -> torch.Tensor:
    """Mean of -log(attention mass a step puts in the region it names).

    Why: the contrastive step term scores a step against pooled evidence, and with the evidence
    tokens' attention uniform over patches (as it starts) all K tokens are the same vector, so that
    term is met by a global match and gives the attention no reason to move. This term uses what
    the pipeline already records: the region a step's text names (``step_regions``, keyword match)
    and each patch's voxel fraction of that region (``regions``).

    Rows: valid steps with ``step_regions`` >= 0 whose region has voxels in the volume (a volume
    without a label map, e.g. a mask-dropout sample, has none); no such step -> a zero loss still
    attached to the graph.

    Shapes: step_embed (B, S, E), step_evidence (B, K, E) normalized; step_valid (B, S) bool;
    evidence_attn (B, K, P); step_regions (B, S) int64 (index into the region names, -1 = none);
    regions (B, P, R+1) patch fractions, column 0 = background.
    """
    b, s = step_valid.shape
    r1 = regions.shape[-1]
    named = step_regions.to(step_valid.device).long()
    ok = step_valid.bool() & (named >= 0) & (named + 1 < r1)
    col = (named + 1).clamp(0, r1 - 1)  # (B, S) region column
    frac = regions.to(evidence_attn.device, torch.float32)  # (B, P, R+1)
    target = torch.gather(frac, 2, col[:, None, :].expand(b, frac.shape[1], s)).transpose(1, 2)  # (B, S, P)
    ok = ok & (target.sum(-1) > 0)
    if not bool(ok.any()):
        return _zero(step_embed, step_evidence, evidence_attn)
    steps = step_embed.float().masked_fill(~ok[..., None], 0.0)  # padding cannot reach the arithmetic
    maps = step_patch_attention(steps, step_evidence.float(), evidence_attn.float(), pool_scale)  # (B, S, P)
    mass = (maps * target)[ok].sum(-1)
    return -torch.log(mass.clamp_min(1e-6)).mean()


def step_alignment_loss(step_embed: torch.Tensor, step_valid: torch.Tensor, step_evidence: torch.Tensor,
                        logit_scale: torch.Tensor, pool_scale: float = 10.0,
                        gather_with_grad: bool = True, step_key: torch.Tensor | None = None) -> torch.Tensor:
    """Each valid CoT step must pick its own volume among the batch's volumes.

    A step embedding t attends over a volume's evidence tokens (softmax(pool_scale * t . e_k))
    and is scored against the pooled evidence; the same pooling is applied to every candidate
    volume, so the positive has no built-in advantage. Rows are only valid steps (padding is
    selected out); columns are all volumes of all ranks (evidence gathered with gradients).

    Shapes: step_embed (B, S, E) normalized; step_valid (B, S) bool; step_evidence (B, K, E) normalized;
    step_key (B, S) int64 (``text_keys`` of the step tokens) or None: with it, a volume holding a
    step token-identical to the row's step (other than the row's own volume) is dropped from the row.
    """
    rank, world = world_info()
    b = step_embed.shape[0]
    valid = step_valid.bool()
    owner = torch.arange(b, device=step_embed.device)[:, None].expand_as(valid)[valid] + rank * b
    steps = step_embed[valid]  # (M, E)
    evidence = gather_features(step_evidence, gather_with_grad)  # (B*world, K, E)
    if steps.shape[0] == 0:
        return _zero(step_embed, step_evidence) + _zero(evidence)
    attn = step_pool_weights(steps[:, None], evidence[None], pool_scale)  # (M, V, K)
    pooled = F.normalize(torch.einsum("mvk,vke->mve", attn, evidence), dim=-1)
    logits = logit_scale * torch.einsum("me,mve->mv", steps, pooled)
    drop = None
    if step_key is not None:
        keys = step_key.masked_fill(~valid, _NO_KEY)  # padded steps never match
        all_keys = gather_features(keys, with_grad=False) if world > 1 else keys  # (V, S)
        drop = (keys[valid][:, None, None] == all_keys[None]).any(-1)  # (M, V)
        drop[torch.arange(drop.shape[0], device=drop.device), owner] = False
        if not bool(drop.any()):
            drop = None
    return _masked_cross_entropy(logits, owner, drop, 0.0)


_NO_KEY = torch.iinfo(torch.int64).min  # key of a padded step (a real key equals it with p ~ 2^-64)


def label_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Multi-label BCE over known labels only (-1 = unknown is selected out)."""
    known = labels >= 0
    if not known.any():
        return _zero(logits)
    return F.binary_cross_entropy_with_logits(logits[known], labels[known].to(logits.dtype))


class MultiTaskLoss:
    """Weighted sum of the terms; a term with weight 0 or whose outputs are absent is skipped.

    ``__call__(outputs, batch) -> (total, {term: detached value})``; term names: clip, region, step,
    step_grounding, labels. Rank and world size come from torch.distributed when it is initialized.
    """

    TERMS = ("clip", "region", "step", "step_grounding", "labels")

    def __init__(self, cfg: LossConfig | dict | None = None):
        if cfg is None:
            cfg = LossConfig()
        elif isinstance(cfg, dict):
            names = {f.name for f in dataclasses.fields(LossConfig)}
            unknown = set(cfg) - names
            if unknown:
                raise ValueError(f"unknown loss option(s) {sorted(unknown)}; valid choices: {sorted(names)}")
            cfg = LossConfig(**cfg)
        self.cfg = cfg

    def terms(self, out: dict, batch: dict) -> dict[str, torch.Tensor]:
        cfg, terms = self.cfg, {}
        if cfg.clip and "text_embed" in out:
            key = (text_keys(batch["report_ids"], batch["report_attn"]).to(out["text_embed"].device)
                   if cfg.dedup_reports and "report_ids" in batch and "report_attn" in batch else None)
            terms["clip"] = clip_loss(out["image_embed"], out["text_embed"], out["logit_scale"],
                                      cfg.gather_with_grad, cfg.label_smoothing, key)
        if cfg.region and "region_embed" in out and "region_text_embed" in out:
            terms["region"] = region_text_loss(
                out["region_embed"], out["region_present"], out["region_text_embed"], out["region_text_valid"],
                batch["region_has_text"], batch["region_text_ids"], batch["region_text_attn"],
                out["local_logit_scale"])
        if cfg.step and "step_embed" in out:
            step_key = (text_keys(batch["steps_ids"], batch["steps_attn"]).to(out["step_embed"].device)
                        if cfg.dedup_steps and "steps_ids" in batch and "steps_attn" in batch else None)
            terms["step"] = step_alignment_loss(out["step_embed"], out["step_valid"], out["step_evidence"],
                                                out["step_logit_scale"], cfg.step_pool_scale, cfg.gather_with_grad,
                                                step_key)
        if (cfg.step_grounding and "step_embed" in out and "evidence_attn" in out
                and "step_regions" in batch and "regions" in batch):
            terms["step_grounding"] = step_grounding_loss(
                out["step_embed"], out["step_valid"], out["step_evidence"], out["evidence_attn"],
                batch["step_regions"], batch["regions"], cfg.step_pool_scale)
        if cfg.labels and "label_logits" in out and "labels" in batch:
            terms["labels"] = label_loss(out["label_logits"], batch["labels"].to(out["label_logits"].device))
        return terms

    def __call__(self, out: dict, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        terms = self.terms(out, batch)
        if not terms:
            raise ValueError("no loss term applies: every weight is 0 or the outputs lack their inputs")
        total = sum(getattr(self.cfg, name) * value for name, value in terms.items())
        return total, {name: value.detach() for name, value in terms.items()}
