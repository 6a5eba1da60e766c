"""Apply an exported encoder to a new scan and free text (open_clip / colipri style).

    from ctprep_train.inference import load_encoder
    model, preprocess, tokenizer = load_encoder("runs/demo/encoder")
    batch = preprocess("scan.nii.gz")                      # + mask="seg.nii.gz", meta={metadata row}
    probs = model.classify(batch, {"effusion": ["Pleural effusion is present.", "Pleural effusion is not present."]})
    emb = model.encode_image(batch)                        # (1, E), L2-normalised

``preprocess`` is the pipeline itself, not a copy of it: the CT-RATE source's ``load`` (v1 / v2
header detection, slope / intercept, mask conformed to the image grid), ``resample_case`` with the
arguments ``run_resample`` passes, the same quarantine checks, and ``regions.patch_region_fraction``
(float16, as stored in the shards), all driven by the export's ``preprocessing.json``. So a raw file
gives the volume the shards hold for it and the embedding the trainer / evaluator computes.

Without a mask: the pipeline's own ``missing_mask: allow`` result, an all-background label map and
a background-only patch assignment (``meta.has_mask`` false), which is what a training case
packed without an anatomy mask looks like; the anatomical encoder then sees no regions (each region
embedding is its learned table row) and region attention puts all weight on background.

Prompts are tokenized as ``ctprep_train.eval`` does (``ctprep.tokenizer.tokenize_padded`` with the
export's tokenizer); ``classify`` is a softmax over a finding's prompts at the model's learned
temperature, so with ("X is present.", "X is not present.") it orders cases exactly as the
evaluator's zero-shot score cos(pos) - cos(neg) does (same AUC).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ctprep_train.export import PREPROCESSING_FILE, has_tokenizer_files, installed_stage_versions, read_tokenizer_identity

NIFTI_SUFFIXES = (".nii.gz", ".nii")
INFERENCE_SPLIT = "inference"  # CaseInput.split of a scan given to preprocess (no stage reads it)


def case_id_of(path: str | os.PathLike[str]) -> str:
    """``train_1_a_1`` for ``.../train_1_a_1.nii.gz`` (the pipeline's case id: the file-name stem)."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


# --------------------------------------------------------------------------- preprocessing


@dataclass
class Preprocess:
    """Raw scan -> the batch the model takes, with the pipeline's code and the export's preset.

    Call it as ``preprocess(path_or_array, mask=None, meta=None)``; see :meth:`__call__`.
    """

    config: Any  # ctprep.config.PipelineConfig
    spec: dict[str, Any]  # preprocessing.json

    @property
    def region_names(self) -> list[str]:
        return list(self.config.regions.names)

    def load(self, image: Any, mask: Any = None, meta: Mapping[str, Any] | None = None,
             case_id: str | None = None):
        """(CaseInput, LoadedCase): the source's reader for a path, the same record for arrays."""
        from ctprep.sources import get_source
        from ctprep.sources.base import CaseInput, LoadedCase

        source = get_source("ctrate", self.config)
        if isinstance(image, (str, os.PathLike)):
            files = {"image": str(image)}
            if isinstance(mask, (str, os.PathLike)):
                files["mask"] = str(mask)
            case = CaseInput(case_id or case_id_of(image), "ctrate", INFERENCE_SPLIT, files, dict(meta or {}))
            loaded = source.load(case)
            if mask is not None and not isinstance(mask, (str, os.PathLike)):
                loaded.labels = _label_array(mask, loaded.image.shape)
            return case, loaded
        array = np.asarray(image)
        if array.ndim != 3:
            raise ValueError(f"expected a 3D volume (i, j, k), got shape {array.shape}")
        if array.dtype.kind not in "iuf":
            raise ValueError(f"expected HU numbers, got dtype {array.dtype}")
        if array.dtype.kind == "f" and array.dtype != np.float32:
            array = array.astype(np.float32)  # never float64 (the sources' rule)
        labels = None
        if mask is not None:
            if isinstance(mask, (str, os.PathLike)):
                raise ValueError("an array image takes an array mask (a mask file needs the image file)")
            labels = _label_array(mask, array.shape)
        case = CaseInput(case_id or "array", "ctrate", INFERENCE_SPLIT, {}, dict(meta or {}))
        loaded = LoadedCase(image=array, labels=labels, affine=array_affine(meta), header_style="array",
                            label_space="totalseg", info={"input_shape_ijk": [int(s) for s in array.shape]})
        return case, loaded

    def __call__(self, image: Any, mask: Any = None, meta: Mapping[str, Any] | None = None, *,
                 case_id: str | None = None, check: bool = True) -> dict[str, Any]:
        """One scan -> a batch of one, in the trainer's batch contract.

        Args:
            image: a ``.nii(.gz)`` path (read by the CT-RATE source: v1 files need ``meta``), or an
                HU array in nibabel voxel order (i, j, k) whose geometry is ``meta["affine"]``
                (voxel -> RAS+ mm) or a CT-RATE metadata row (``XYSpacing``, ``ZSpacing``, ...).
            mask: None (no segmentation: all background, see the module docstring), a
                TotalSegmentator-style label map path on the image's grid, or an array like ``image``.
            meta: the CT-RATE metadata CSV row of the file (column name -> value); needed for a v1
                file (blank header: spacing, orientation, slope / intercept come from it).
            case_id: id reported in ``batch["ids"]`` (default: the file-name stem).
            check: apply the pipeline's quarantine checks (constant volume, not a chest); they raise
                ``ctprep.quarantine.QuarantineError`` like a quarantined case.

        Returns:
            ``image`` int16 (1, Z, Y, X) HU, ``mask`` uint8 (1, Z, Y, X) region ids, ``regions``
            float16 (1, P, R + 1) patch-to-region fractions, ``ids`` [case id], ``meta`` [dict]
            (``has_mask``, ``spacing``, ``affine``, ``shape``, ``header_style``, ``region_names``).
        """
        from ctprep.sources import get_source
        from ctprep.stages.regions import patch_region_fraction
        from ctprep.stages.resample import resample_loaded

        cfg = self.config
        case, loaded = self.load(image, mask, meta, case_id)
        # The resample stage's own per-case function: the same grid, LUT, clip, pad, slab size, checks.
        res, affine = resample_loaded(case, loaded, get_source("ctrate", cfg), cfg, check=check)
        regions = patch_region_fraction(res.mask, len(cfg.regions.names), tuple(cfg.regions.patch_size_zyx))
        meta_out = {
            "id": case.case_id,
            "has_mask": loaded.labels is not None,
            "spacing": list(res.spacing_zyx),
            "affine": affine.tolist(),
            "shape": list(res.image.shape),
            "header_style": loaded.header_style,
            "region_names": self.region_names,
            "fov_fraction": round(res.fov_fraction, 4),
            "input": {**loaded.info, **res.info},
        }
        return {
            "image": torch.from_numpy(res.image)[None],
            "mask": torch.from_numpy(res.mask)[None],
            "regions": torch.from_numpy(regions)[None],
            "ids": [case.case_id],
            "meta": [meta_out],
        }


def _label_array(mask: Any, shape: tuple[int, ...]) -> np.ndarray:
    labels = np.asarray(mask)
    if labels.shape != tuple(shape):
        raise ValueError(f"mask shape {labels.shape} != image shape {tuple(shape)}")
    if labels.dtype.kind == "f":
        labels = np.rint(np.nan_to_num(labels)).astype(np.int16)
    return labels


def array_affine(meta: Mapping[str, Any] | None) -> np.ndarray:
    """Voxel (i, j, k) -> RAS+ mm of an array input: ``meta["affine"]`` or a CT-RATE metadata row."""
    from ctprep.sources.ctrate import v1_affine

    meta = dict(meta or {})
    if "affine" in meta:
        affine = np.asarray(meta["affine"], dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise ValueError(f"meta['affine'] must be a finite 4x4 matrix, got shape {affine.shape}")
        return affine
    if "XYSpacing" in meta:
        return v1_affine(meta)[0]
    raise ValueError("an array image needs its geometry: meta={'affine': 4x4 voxel->RAS+ mm} or a CT-RATE "
                     "metadata row (XYSpacing, ZSpacing, ImageOrientationPatient)")


def collate(batches: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack single-scan batches of :class:`Preprocess` (same grid) into one batch."""
    out: dict[str, Any] = {k: torch.cat([b[k] for b in batches]) for k in ("image", "mask", "regions")}
    out["ids"] = [i for b in batches for i in b["ids"]]
    out["meta"] = [m for b in batches for m in b["meta"]]
    return out


# --------------------------------------------------------------------------- text


class PromptTokenizer:
    """Text -> (ids (N, L) int64, attention (N, L) bool), as ``ctprep_train.eval`` tokenizes prompts.

    Attributes:
        loaded: the ``ctprep.tokenizer.LoadedTokenizer`` (``.tokenizer`` is the Hugging Face one).
        max_len: tokens incl. special tokens (the pipeline's report length).
    """

    def __init__(self, loaded: Any, max_len: int):
        self.loaded = loaded
        self.max_len = int(max_len)

    @property
    def identity(self) -> dict[str, str]:
        return dict(self.loaded.identity)

    def __call__(self, texts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from ctprep.tokenizer import tokenize_padded

        texts = [texts] if isinstance(texts, str) else list(texts)
        ids, lens = tokenize_padded(self.loaded, texts, self.max_len)
        attn = torch.arange(ids.shape[1])[None] < torch.from_numpy(lens)[:, None]
        return torch.from_numpy(ids.astype(np.int64)), attn


# --------------------------------------------------------------------------- model


class CTEncoder:
    """A loaded CTCLIP (``.clip``, eval mode) with text given as strings.

    Embeddings come back L2-normalised, float32, on the CPU.
    """

    def __init__(self, clip: torch.nn.Module, tokenizer: PromptTokenizer, device: str | torch.device = "cpu",
                 spec: dict[str, Any] | None = None):
        self.clip = clip.eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.spec = spec or {}

    def _on_device(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    @torch.no_grad()
    def encode_image(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """(B, E) global embedding of a :class:`Preprocess` batch (or a collated shard batch)."""
        return self.clip.encode_image(self._on_device(batch)).float().cpu()

    @torch.no_grad()
    def encode_text(self, texts: str | Sequence[str]) -> torch.Tensor:
        """(N, E) embedding of each sentence."""
        ids, attn = self.tokenizer(texts)
        return self.clip.encode_text(ids.to(self.device), attn.to(self.device)).float().cpu()

    @staticmethod
    def similarity(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """(B, N) cosine similarity."""
        return F.normalize(image_emb.float(), dim=-1) @ F.normalize(text_emb.float(), dim=-1).T

    @property
    def logit_scale(self) -> float:
        """The learned inverse temperature of the global contrastive term (exp'd, clamped)."""
        return float(self.clip._scale(self.clip.logit_scale).detach())

    def classify_batch(self, batch: Mapping[str, Any], prompts: Mapping[str, Sequence[str]],
                       image_emb: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per finding, (B,) float64 softmax probability of its first (positive) prompt."""
        names = list(prompts)
        for name in names:
            texts = prompts[name]
            if isinstance(texts, str) or len(texts) < 2 or not all(isinstance(t, str) and t for t in texts):
                raise ValueError(f"prompts[{name!r}] must be a list of >= 2 sentences (positive first), got {texts!r}")
        img = self.encode_image(batch) if image_emb is None else image_emb
        flat = [t for name in names for t in prompts[name]]
        sims = self.similarity(img, self.encode_text(flat)).double()  # (B, sum of prompt counts)
        out, start = {}, 0
        for name in names:
            n = len(prompts[name])
            out[name] = torch.softmax(self.logit_scale * sims[:, start:start + n], dim=-1)[:, 0]
            start += n
        return out

    def classify(self, batch: Mapping[str, Any], prompts: Mapping[str, Sequence[str]]) -> dict[str, float]:
        """Zero-shot scores of one volume: finding -> P(first prompt) among that finding's prompts.

        Example: ``classify(batch, {"effusion": ["pleural effusion", "no pleural effusion"]})``.
        """
        if len(batch["image"]) != 1:
            raise ValueError(f"classify takes one volume, got a batch of {len(batch['image'])} (use classify_batch)")
        return {name: float(p[0]) for name, p in self.classify_batch(batch, prompts).items()}

    @torch.no_grad()
    def similarity_map(self, batch: Mapping[str, Any], prompt: str) -> dict[str, np.ndarray]:
        """Where in the volume the prompt matches: cosine of each patch's local embedding and the text.

        Each patch token (plus its assignment-weighted anatomical region embedding, as the local
        head sees pooled region features in training) goes through the local (region <-> region
        text) head. Returns ``grid`` (Gz, Gy, Gx) and ``volume`` (Z, Y, X), the grid upsampled
        trilinearly to the volume; first case of the batch.
        """
        vis = self.clip.visual
        dev = self._on_device(batch)
        feats = vis.forward_features(dev["image"][:1], _first(dev.get("mask")), _first(dev.get("regions")))
        patches = feats["tokens"][:, 1:]
        if feats.get("region_embed") is not None and feats.get("assignment") is not None:
            w = feats["assignment"][..., 1:].to(patches.dtype)  # (1, P, R): background dropped
            patches = patches + torch.einsum("bpr,brc->bpc", w, feats["region_embed"][:, 1:].to(patches.dtype))
        local = F.normalize(vis.head_local(patches).float(), dim=-1)  # (1, P, E)
        text = self.encode_text([prompt]).to(local.device)
        grid = tuple(int(g) for g in feats["grid"])
        sim = (local @ text.T)[0, :, 0].reshape(grid)
        volume = F.interpolate(sim[None, None], size=tuple(batch["image"].shape[1:]), mode="trilinear",
                               align_corners=False)[0, 0]
        return {"grid": sim.cpu().numpy(), "volume": volume.cpu().numpy()}

    def save_similarity_map(self, batch: Mapping[str, Any], prompt: str, path: str | os.PathLike[str],
                            slices: int = 4) -> Path:
        """PNG of ``slices`` axial slices with the prompt's similarity map overlaid (radiological view)."""
        maps = self.similarity_map(batch, prompt)
        image = batch["image"][0].numpy()
        mask = batch["mask"][0].numpy() if "mask" in batch else None
        return plot_similarity_slices(image, maps["volume"], Path(path), prompt, mask, slices,
                                      title=f"{batch.get('ids', ['?'])[0]}: \"{prompt}\"")


def _first(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x[:1]


def plot_similarity_slices(image: np.ndarray, heat: np.ndarray, path: Path, prompt: str,
                           mask: np.ndarray | None = None, slices: int = 4, title: str = "") -> Path:
    """Axial slices (evenly spaced through the volume, the peak slice included) with one colour
    scale for all panels (unlike the per-panel scaled attention pictures: similarity is comparable)."""
    from ctprep_train.eval import pictures

    plt = pictures.plt
    z_peak = int(np.unravel_index(int(np.argmax(heat)), heat.shape)[0])
    zs = sorted({*np.linspace(0, image.shape[0] - 1, slices + 2)[1:-1].round().astype(int).tolist(), z_peak})
    lo, hi = float(heat.min()), float(heat.max())
    fig, axes = plt.subplots(1, len(zs), figsize=(2.8 * len(zs) + 0.8, 3.2), squeeze=False)
    for ax, z in zip(axes[0], zs):
        ax.imshow(pictures._axial(image, z), cmap="gray", vmin=pictures.HU_WINDOW[0], vmax=pictures.HU_WINDOW[1],
                  interpolation="nearest")
        im = ax.imshow(pictures._axial(heat, z), cmap="inferno", alpha=0.5, vmin=lo, vmax=hi, interpolation="bilinear")
        if mask is not None and mask[z].max() > 0:
            ax.contour(pictures._axial(mask, z), levels=np.arange(0.5, mask.max() + 0.5), colors="cyan", linewidths=0.4)
        ax.set_title(f"axial z={z}" + (" (peak)" if z == z_peak else ""), fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label=f"cos(patch, '{prompt[:40]}')")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- loading


def read_preprocessing(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / PREPROCESSING_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: this encoder folder does not record its preprocessing. Export it with "
            "`python -m ctprep_train.export RUN --out DIR` (add --pipeline-config PRESET if the shards' manifest is gone), "
            "or pass pipeline_config= to load_encoder")
    return json.loads(path.read_text())


def load_encoder(directory: str | os.PathLike[str], device: str | torch.device = "cpu",
                 pipeline_config: str | os.PathLike[str] | None = None) -> tuple[CTEncoder, Preprocess, PromptTokenizer]:
    """``model, preprocess, tokenizer`` from a ``ctprep_train.export`` folder (or a run's ``encoder/``).

    Args:
        directory: the export folder.
        device: where the model runs ("cpu", "cuda", ...).
        pipeline_config: preset name / YAML to use instead of the folder's ``preprocessing.json``
            (for an encoder exported before it was recorded; it must be the shards' preset).
    """
    from ctprep.config import config_from_dict
    from ctprep.tokenizer import load_tokenizer

    from ctprep_train.export import preprocessing_spec
    from ctprep_train.model import load_pretrained

    directory = Path(directory)
    if pipeline_config is not None:
        from ctprep.config import load_config

        spec = preprocessing_spec(load_config(pipeline_config).to_json(), recorded_from=str(pipeline_config))
    else:
        spec = read_preprocessing(directory)
    config = config_from_dict(spec["pipeline_config"], name=str(spec["pipeline_config"].get("name", "custom")))
    _warn_on_version_drift(spec)
    clip = load_pretrained(directory, device=device).eval()
    patch = [int(p) for p in clip.cfg.vision.patch.patch_size]
    if patch != [int(p) for p in config.regions.patch_size_zyx]:
        raise ValueError(f"{directory}: model patch {patch} != preprocessing patch {list(config.regions.patch_size_zyx)}")
    loaded = load_tokenizer(str(directory) if has_tokenizer_files(directory) else clip.cfg.text.path)
    recorded = read_tokenizer_identity(directory)
    if recorded is not None and recorded["hash"] != loaded.identity["hash"]:
        raise ValueError(f"{directory}: tokenizer files hash {loaded.identity['hash'][:12]} != the identity the "
                         f"model was trained with ({recorded['name']}, {recorded['hash'][:12]})")
    tokenizer = PromptTokenizer(loaded, config.text.max_len_report)
    return CTEncoder(clip, tokenizer, device, spec), Preprocess(config, spec), tokenizer


def _warn_on_version_drift(spec: dict[str, Any]) -> None:
    import ctprep

    recorded = spec.get("stage_versions", {})
    installed = installed_stage_versions()
    drift = {k: (recorded.get(k), v) for k, v in installed.items() if recorded.get(k) not in (None, v)}
    if drift:
        warnings.warn(f"preprocessing code differs from the shards' build (stage: (recorded, installed)) {drift}; "
                      "volumes may differ from what the model was trained on", stacklevel=3)
    if spec.get("pipeline_version") not in (None, ctprep.__version__):
        warnings.warn(f"ctprep {ctprep.__version__} installed, shards built with {spec.get('pipeline_version')}",
                      stacklevel=3)
