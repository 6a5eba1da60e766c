"""Evaluation pictures (matplotlib, Agg backend, PNG files).

Plotting functions take plain arrays; extracting those arrays from a model is
``ctprep_train.eval.run``'s job. Axis conventions: volumes are (Z, Y, X) in the
canonical orientation of ``ctprep.schema`` (increasing z, y, x = Superior,
Anterior, Right). Pictures are drawn in radiological convention: axial slices
with patient anterior at the top and patient right on the viewer's left,
coronal slices with superior at the top and patient right on the left.
Attention maps on the patch grid (Gz, Gy, Gx) are expanded to voxels by
repeating each patch value over its ``patch_size`` block (no smoothing, so a
reader sees the real resolution of the attention) and min-max scaled per panel
(the picture shows *where* attention is relatively high; absolute mass is in
the CoT alignment table).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

HU_WINDOW = (-1000.0, 400.0)  # lung-and-mediastinum compromise for the greyscale background


def _axial(vol: np.ndarray, z: int) -> np.ndarray:
    # vol[z] is (Y, X) with y -> anterior, x -> right. Radiological view: anterior up, right on the left.
    return vol[z][::-1, ::-1]


def _coronal(vol: np.ndarray, y: int) -> np.ndarray:
    # vol[:, y] is (Z, X): superior up, patient right on the viewer's left.
    return vol[:, y][::-1, ::-1]


def expand_to_voxels(grid_map: np.ndarray, patch_size: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """Repeat a (Gz, Gy, Gx) patch map to voxel resolution, cropped/padded to ``shape`` (Z, Y, X)."""
    out = grid_map
    for axis, p in enumerate(patch_size):
        out = np.repeat(out, int(p), axis=axis)
    full = np.zeros(tuple(shape), dtype=np.float32)
    sl = tuple(slice(0, min(a, b)) for a, b in zip(out.shape, shape))
    full[sl] = out[sl]
    return full


def plot_slice_bias(tables: Sequence[np.ndarray], path: str | Path, title: str = "") -> Path:
    """Learned slice-distance bias: one heatmap per layer, heads x |z_i - z_j| (patch layers).

    Args:
        tables: per layer, an array (num_heads, max_distance) of additive attention-logit biases.
    """
    path = Path(path)
    n = len(tables)
    if n == 0:
        fig, ax = plt.subplots(figsize=(5, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, "slice bias switched off in this model", ha="center", va="center")
    else:
        vmax = max(float(np.abs(t).max()) for t in tables) or 1.0
        fig, axes = plt.subplots(1, n, figsize=(3.2 * n + 1, 3.0), squeeze=False, layout="constrained")
        for i, t in enumerate(tables):
            ax = axes[0, i]
            im = ax.imshow(t, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto", interpolation="nearest")
            ax.set_title(f"layer {i}")
            ax.set_xlabel("slice distance |dz| (patch layers)")
            ax.set_ylabel("head")
            ax.set_yticks(range(t.shape[0]))
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="bias (logit)")
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def _save(fig, path: str | Path, title: str = "") -> Path:
    """Title, lay out, write and close a figure (closing matters: evaluate draws many)."""
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def _overlay(ax, base: np.ndarray, heat: np.ndarray | None, title: str, contour: np.ndarray | None = None) -> None:
    ax.imshow(base, cmap="gray", vmin=HU_WINDOW[0], vmax=HU_WINDOW[1], interpolation="nearest")
    if heat is not None:
        # min-max per panel: attention maps are close to uniform early in training, and the reader
        # wants to see where the mass is relatively larger; absolute mass is in the CoT table.
        lo, hi = float(heat.min()), float(heat.max())
        h = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
        ax.imshow(np.ma.masked_less(h, 0.05), cmap="inferno", alpha=0.55, vmin=0, vmax=1, interpolation="nearest")
    if contour is not None and contour.max() > 0:
        ax.contour(contour, levels=np.arange(0.5, contour.max() + 0.5), colors="cyan", linewidths=0.5)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_attention_overlays(
    image: np.ndarray,
    mask: np.ndarray,
    maps: dict[str, np.ndarray],
    patch_size: Sequence[int],
    path: str | Path,
    title: str = "",
) -> Path:
    """Axial and coronal slices with attention overlays.

    Args:
        image: (Z, Y, X) HU.
        mask: (Z, Y, X) coarse region ids (drawn as cyan contours on the first column).
        maps: name -> (Gz, Gy, Gx) attention on the patch grid (e.g. "CLS attention", "region attention").
        patch_size: (pz, py, px) voxels per patch.

    The slices go through the voxel where the first map peaks, so the picture shows what was attended.
    """
    path = Path(path)
    first = next(iter(maps.values())) if maps else None
    if first is not None and first.size:
        gz, gy, _ = np.unravel_index(int(np.argmax(first)), first.shape)
        z = min(int(gz * patch_size[0] + patch_size[0] // 2), image.shape[0] - 1)
        y = min(int(gy * patch_size[1] + patch_size[1] // 2), image.shape[1] - 1)
    else:
        z, y = image.shape[0] // 2, image.shape[1] // 2
    voxel_maps = {k: expand_to_voxels(v, patch_size, image.shape) for k, v in maps.items()}
    cols = 1 + len(maps)
    # coronal slices of a thick-slab volume are short: give them height by aspect (spacing unknown here)
    fig, axes = plt.subplots(2, cols, figsize=(2.6 * cols, 5.4), squeeze=False)
    _overlay(axes[0, 0], _axial(image, z), None, f"axial z={z} + regions", _axial(mask, z))
    _overlay(axes[1, 0], _coronal(image, y), None, f"coronal y={y} + regions", _coronal(mask, y))
    for c, (name, vm) in enumerate(voxel_maps.items(), start=1):
        _overlay(axes[0, c], _axial(image, z), _axial(vm, z), f"{name} (axial)")
        _overlay(axes[1, c], _coronal(image, y), _coronal(vm, y), f"{name} (coronal)")
    for ax in axes[1]:
        ax.set_aspect(max(1.0, image.shape[1] / max(image.shape[0], 1) / 2), adjustable="box")
    return _save(fig, path, title)


def plot_step_attention(
    image: np.ndarray,
    steps: Sequence[str],
    step_maps: Sequence[np.ndarray],
    named_regions: Sequence[str | None],
    patch_size: Sequence[int],
    path: str | Path,
    mask: np.ndarray | None = None,
    region_ids: Sequence[int | None] | None = None,
    title: str = "",
) -> Path:
    """Where each CoT step's evidence attends: one axial panel per step at that step's attention peak.

    Args:
        steps: the step texts.
        step_maps: per step, (Gz, Gy, Gx) attention over patches (sums to 1).
        named_regions: per step, the anatomy the step names (or None).
        region_ids: per step, the mask id of that anatomy (1-based) to outline, or None.
    """
    path = Path(path)
    n = max(len(steps), 1)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 4.0 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for s, (text, gm) in enumerate(zip(steps, step_maps)):
        ax = axes.ravel()[s]
        gz = int(np.unravel_index(int(np.argmax(gm)), gm.shape)[0])
        z = min(gz * patch_size[0] + patch_size[0] // 2, image.shape[0] - 1)
        vm = expand_to_voxels(gm, patch_size, image.shape)
        outline = None
        if mask is not None and region_ids is not None and region_ids[s] is not None:
            outline = (_axial(mask, z) == region_ids[s]).astype(np.float32)
        region = named_regions[s] if s < len(named_regions) else None
        label = f"step {s + 1}" + (f" [{region}]" if region else "")
        _overlay(ax, _axial(image, z), _axial(vm, z), label + "\n" + textwrap.fill(text, 40)[:160], outline)
        ax.axis("on")
    return _save(fig, path, title)


def plot_cot_alignment(per_region: dict[str, dict[str, float]], path: str | Path) -> Path:
    """Bar chart: mean attention mass in the named region vs chance (region's voxel fraction)."""
    path = Path(path)
    names = list(per_region)
    fig, ax = plt.subplots(figsize=(1.2 * max(len(names), 2) + 2, 3))
    x = np.arange(len(names))
    ax.bar(x - 0.2, [per_region[n]["mean_mass"] for n in names], 0.4, label="attention mass in region")
    ax.bar(x + 0.2, [per_region[n]["mean_chance"] for n in names], 0.4, label="chance (voxel fraction)")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel("fraction")
    ax.legend(fontsize=7)
    return _save(fig, path)
