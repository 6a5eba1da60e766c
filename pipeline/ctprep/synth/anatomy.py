"""Analytic chest phantom: anatomy and findings defined in patient millimetres.

Everything here is a function of physical coordinates (RAS+ mm: +x = patient
Right, +y = Anterior, +z = Superior), so the same :class:`Anatomy` rendered on
two grids (two reconstructions of one scan) shows the same organs and findings
at the same places. Rendering works on a canonical (Z, Y, X) array whose
increasing indices point S, A, R (``ctprep.schema.CANONICAL_ORIENTATION``).

Structures that do not change along z (body wall, spine, trachea, esophagus)
are computed as 2D masks and broadcast; localized ones (heart, aorta, lesions)
only inside their bounding box, so a 60 x 160 x 160 volume renders in ~0.1 s.

Findings are drawn by their kinds (``ctprep.synth.finding_kinds``), at the stage of
``render_chest`` each kind names: with the heart, with the aorta, or after the whole
anatomy; a kind may also change the heart (``Anatomy.heart_radii`` / ``heart_pad``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

# TotalSegmentator v2 "total" ids (configs/regions/totalsegmentator_v2_total.json).
LIVER, STOMACH = 5, 6
LUNG_UPPER_LEFT, LUNG_LOWER_LEFT = 10, 11
LUNG_UPPER_RIGHT, LUNG_MIDDLE_RIGHT, LUNG_LOWER_RIGHT = 12, 13, 14
ESOPHAGUS, TRACHEA = 15, 16
VERTEBRA_T1 = 43  # id = 43 - level index: T1..T12 -> 43..32, L1.. -> 31.., C7 -> 44
HEART, AORTA = 51, 52
RIB_LEFT_1, RIB_RIGHT_1, STERNUM = 92, 104, 116
BRAIN, SKULL = 90, 91

CAGE_WALL = 18.0  # mm of muscle (10) + ribs (8) inside the subcutaneous fat

LOBE_NAMES = {
    LUNG_UPPER_LEFT: "left upper lobe",
    LUNG_LOWER_LEFT: "left lower lobe",
    LUNG_UPPER_RIGHT: "right upper lobe",
    LUNG_MIDDLE_RIGHT: "right middle lobe",
    LUNG_LOWER_RIGHT: "right lower lobe",
}
LEFT_LOBES = (LUNG_UPPER_LEFT, LUNG_LOWER_LEFT)
RIGHT_LOBES = (LUNG_UPPER_RIGHT, LUNG_MIDDLE_RIGHT, LUNG_LOWER_RIGHT)
LUNG_IDS = LEFT_LOBES + RIGHT_LOBES


@dataclass(frozen=True)
class Grid:
    """A canonical voxel grid: array (Z, Y, X), indices increasing S, A, R.

    ``origin`` is the RAS+ mm position of voxel (0, 0, 0)'s centre as (z, y, x).
    """

    shape: tuple[int, int, int]  # (Z, Y, X) voxels
    spacing: tuple[float, float, float]  # (dz, dy, dx) mm
    origin: tuple[float, float, float]  # (z0, y0, x0) mm

    def axis(self, k: int) -> np.ndarray:
        return (self.origin[k] + self.spacing[k] * np.arange(self.shape[k])).astype(np.float32)

    def box(self, lo: tuple[float, float, float], hi: tuple[float, float, float]) -> tuple[slice, ...]:
        """Index slices covering the mm box [lo, hi] (z, y, x), clipped to the grid."""
        out = []
        for k in range(3):
            a = int(np.floor((lo[k] - self.origin[k]) / self.spacing[k]))
            b = int(np.ceil((hi[k] - self.origin[k]) / self.spacing[k])) + 1
            out.append(slice(max(a, 0), max(min(b, self.shape[k]), 0)))
        return tuple(out)

    def coords(self, sl: tuple[slice, ...] | None = None):
        """Broadcastable (z (Z,1,1), y (1,Y,1), x (1,1,X)) mm coordinates of a sub-box."""
        sl = sl or (slice(None),) * 3
        z, y, x = (self.axis(k)[sl[k]] for k in range(3))
        return z[:, None, None], y[None, :, None], x[None, None, :]


@dataclass
class Finding:
    """One abnormality: what is drawn, where, and the words for it."""

    kind: str  # a kind's name in ctprep.synth.finding_kinds (e.g. "nodule"), which defines the rest
    label: str  # one of ctprep.schema.ABNORMALITY_LABELS
    params: dict = field(default_factory=dict)  # kind-specific geometry (mm) and wording choices


def _kind_of(f: Finding):
    """The finding kind (``ctprep.synth.finding_kinds``) that samples, draws and describes ``f``."""
    # The kinds draw with this module's geometry (they import it), so the registry is imported on use.
    from ctprep.synth.finding_kinds import kind_of

    return kind_of(f.kind)


@dataclass
class Anatomy:
    """Per-scan body geometry (mm). All reconstructions of a scan share one."""

    ax: float  # body half-width (x)
    ay: float  # body half-depth (y)
    fat: float  # subcutaneous fat thickness
    z_apex: float  # lung apex height
    lung_h: float  # apex to diaphragm base
    dome_h: float  # diaphragm dome height above z_base
    fissure_slope: float  # oblique fissure dz/dy
    fissure_off: tuple[float, float]  # (right, left) oblique fissure offset mm
    horizontal_frac: float  # right horizontal fissure height / lung_h
    heart_c: tuple[float, float, float]  # (z, y, x) centre
    heart_r: tuple[float, float, float]  # (z, y, x) semi-axes, before cardiomegaly
    aorta_r: float  # aortic radius
    trachea_r: float
    spine_r: float
    level_h: float  # vertebral level height
    vessels: list[tuple[tuple[float, float, float], tuple[float, float, float], float]] = field(default_factory=list)
    # pulmonary vessel segments (p0, p1 (z, y, x) mm, radius mm), drawn inside the lungs only
    findings: list[Finding] = field(default_factory=list)

    @property
    def z_base(self) -> float:
        return self.z_apex - self.lung_h

    @property
    def z_carina(self) -> float:
        return self.z_apex - 0.33 * self.lung_h

    @property
    def z_arch(self) -> float:
        return self.z_apex - 0.22 * self.lung_h

    @property
    def spine_y(self) -> float:
        return -0.70 * self.ay

    @property
    def trachea_y(self) -> float:
        return -0.18 * self.ay

    @property
    def esophagus_xy(self) -> tuple[float, float]:
        return (-0.03 * self.ax, -0.45 * self.ay)

    @property
    def aorta_desc_xy(self) -> tuple[float, float]:
        return (-0.19 * self.ax, -0.48 * self.ay)

    @property
    def aorta_asc_xy(self) -> tuple[float, float]:
        return (0.08 * self.ax, 0.12 * self.ay)

    def heart_radii(self) -> tuple[float, float, float]:
        """(z, y, x) semi-axes of the heart with its findings (cardiomegaly scales them)."""
        s = 1.0
        for f in self.findings:
            s *= _kind_of(f).heart_scale(f.params)
        return tuple(r * s for r in self.heart_r)  # type: ignore[return-value]

    def heart_pad(self) -> float:
        """mm around the heart taken by its findings (pericardial fluid); 0 without."""
        pad = 0.0
        for f in self.findings:
            pad += _kind_of(f).heart_pad(f.params)
        return pad

    def lung(self, side: int) -> tuple[float, float, float, float]:
        """(cx, cy, rx, ry) of the lung footprint; side +1 = right, -1 = left."""
        return (side * 0.47 * self.ax, -0.06 * self.ay, (0.37 if side > 0 else 0.35) * self.ax, 0.78 * self.ay)


def sample_anatomy(rng: np.random.Generator, z_apex: float) -> Anatomy:
    ax = float(rng.uniform(140, 180))
    ay = float(rng.uniform(95, 120))
    lung_h = float(rng.uniform(215, 255))
    z_base = z_apex - lung_h
    a = Anatomy(
        ax=ax,
        ay=ay,
        fat=float(rng.uniform(8, 22)),
        z_apex=z_apex,
        lung_h=lung_h,
        dome_h=float(rng.uniform(25, 45)),
        fissure_slope=float(rng.uniform(0.8, 1.1)),
        fissure_off=(float(rng.uniform(-10, 10)), float(rng.uniform(-10, 10))),
        horizontal_frac=float(rng.uniform(0.58, 0.66)),
        heart_c=(z_base + float(rng.uniform(0.22, 0.27)) * lung_h, 0.14 * ay, -0.14 * ax),
        heart_r=(float(rng.uniform(48, 58)), float(rng.uniform(42, 50)), float(rng.uniform(55, 64))),
        aorta_r=float(rng.uniform(12, 18)),
        trachea_r=float(rng.uniform(8, 10.5)),
        spine_r=float(rng.uniform(15, 19)),
        level_h=float(rng.uniform(21, 25)),
    )
    a.vessels = _sample_vessels(a, rng)
    return a


def _sample_vessels(a: Anatomy, rng: np.random.Generator, per_lung: int = 9):
    """Pulmonary vessel trees: tapering segments from each hilum towards the periphery."""
    out = []
    for side in (1, -1):
        hilum = (a.z_carina - 30.0, a.trachea_y - 4.0, side * 0.27 * a.ax)
        cand = np.stack([rng.uniform(a.z_base, a.z_apex, 400), rng.uniform(-a.ay, a.ay, 400),
                         side * rng.uniform(0.2 * a.ax, a.ax, 400)], 1).astype(np.float32)  # fmt: skip
        cand = cand[lung_side_at(a, side, cand[:, 0], cand[:, 1], cand[:, 2])][:per_lung]
        for end in cand:
            mid = tuple(float(h + 0.5 * (e - h)) for h, e in zip(hilum, end))
            out.append((hilum, mid, 3.5))
            out.append((mid, tuple(float(v) for v in end), 2.0))
    return out


# ----------------------------------------------------------------------------------------------
# Point predicates (vectorised over broadcastable z, y, x arrays)


def _body_rho2(a: Anatomy, y, x):
    return (x / a.ax) ** 2 + (y / a.ay) ** 2


def _cage_inner(a: Anatomy, y, x):
    """Inside the rib cage (inner surface of the ribs)."""
    return _body_rho2(a, y, x) < (1.0 - (a.fat + CAGE_WALL) / a.ay) ** 2


def diaphragm_z(a: Anatomy, y, x):
    """Height of the diaphragm surface; right dome sits ~10 mm higher."""
    cy = a.lung(1)[1]
    u = (np.abs(x) - 0.49 * a.ax) / (0.40 * a.ax)
    v = (y - cy) / (0.74 * a.ay)
    dome = np.clip(1.0 - u * u - v * v, 0.0, 1.0)
    return a.z_base + a.dome_h * dome + np.where(x > 0, 10.0, 0.0)


def _lung_scale(a: Anatomy, z):
    """Footprint scale along z: a rounded apex, full width below the upper third."""
    t = np.clip((a.z_apex - z) / (0.38 * a.lung_h), 0.0, 1.0)
    return np.sqrt(t * (2.0 - t))


def lung_side_at(a: Anatomy, side: int, z, y, x):
    """Boolean: inside the pleural envelope of one lung (before organs carve it)."""
    cx, cy, rx, ry = a.lung(side)
    s = _lung_scale(a, z) + 1e-6
    inside = ((x - cx) / (rx * s)) ** 2 + ((y - cy) / (ry * s)) ** 2 <= 1.0
    return inside & (z <= a.z_apex) & (z >= diaphragm_z(a, y, x)) & _cage_inner(a, y, x)


def lobe_at(a: Anatomy, z, y, x):
    """Lobe id (10-14) or 0 at each point, from the pleural envelopes and fissure planes."""
    right = lung_side_at(a, 1, z, y, x)
    left = lung_side_at(a, -1, z, y, x)
    cy = a.lung(1)[1]
    mid = a.z_base + 0.52 * a.lung_h
    # Oblique fissure: high posteriorly, low anteriorly; lower lobe lies below/behind it.
    lower_r = z < mid + a.fissure_off[0] - a.fissure_slope * (y - cy)
    lower_l = z < mid + a.fissure_off[1] - a.fissure_slope * (y - cy)
    middle = z < a.z_base + a.horizontal_frac * a.lung_h
    out = np.where(right, np.where(lower_r, LUNG_LOWER_RIGHT, np.where(middle, LUNG_MIDDLE_RIGHT, LUNG_UPPER_RIGHT)), 0)
    out = np.where(left, np.where(lower_l, LUNG_LOWER_LEFT, LUNG_UPPER_LEFT), out)
    return out.astype(np.uint8)


def heart_at(a: Anatomy, z, y, x, pad: float = 0.0):
    rz, ry, rx = (r + pad for r in a.heart_radii())
    cz, cy, cx = a.heart_c
    return ((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def lung_rho(a: Anatomy, side: int, z, y, x):
    """Normalised radius in one lung's footprint: 0 at its axis, 1 at the pleura (costal surface)."""
    cx, cy, rx, ry = a.lung(side)
    s = _lung_scale(a, z) + 1e-6
    return np.sqrt(((x - cx) / (rx * s)) ** 2 + ((y - cy) / (ry * s)) ** 2)


def effusion_at(a: Anatomy, side: int, depth: float, z, y, x):
    """Dependent (posterior, basal) part of one pleural space."""
    cx, cy, rx, ry = a.lung(side)
    y_post = cy - ry * _lung_scale(a, z)
    return lung_side_at(a, side, z, y, x) & (y < y_post + depth) & (z < a.z_base + 0.62 * a.lung_h)


def capsule_at(z, y, x, p0, p1, r):
    """Points within r of the segment p0-p1 (z, y, x mm)."""
    p0 = np.asarray(p0, np.float32)
    d = np.asarray(p1, np.float32) - p0
    dd = float(d @ d) or 1.0
    t = np.clip(((z - p0[0]) * d[0] + (y - p0[1]) * d[1] + (x - p0[2]) * d[2]) / dd, 0.0, 1.0)
    return (z - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2 + (x - p0[2] - t * d[2]) ** 2 <= r * r


def aorta_segments(a: Anatomy, z_low: float):
    xa, ya = a.aorta_asc_xy
    xd, yd = a.aorta_desc_xy
    cz = a.heart_c[0]
    return [
        ((cz + 0.4 * a.heart_r[0], ya, xa), (a.z_arch, ya, xa)),  # ascending
        ((a.z_arch, ya, xa), (a.z_arch + 8.0, 0.5 * (ya + yd), 0.5 * (xa + xd))),  # arch
        ((a.z_arch + 8.0, 0.5 * (ya + yd), 0.5 * (xa + xd)), (a.z_arch, yd, xd)),
        ((a.z_arch, yd, xd), (z_low, yd, xd)),  # descending
    ]


def aorta_at(a: Anatomy, z, y, x, z_low: float, r: float | None = None):
    r = a.aorta_r if r is None else r
    m = np.zeros(np.broadcast_shapes(np.shape(z), np.shape(y), np.shape(x)), bool)
    for p0, p1 in aorta_segments(a, z_low):
        m |= capsule_at(z, y, x, p0, p1, r)
    return m


# ----------------------------------------------------------------------------------------------
# Rendering


# When render_chest draws a kind (``FindingKind.stage``):
STAGE_HEART = "heart"  # just before the heart, in the heart's box (the heart then covers the kind's inside)
STAGE_AORTA = "aorta"  # just after the aorta, in its box (organs drawn later cover it as they cover the aorta)
STAGE_LESION = "lesion"  # after the whole anatomy, in the order of the scan's findings
STAGES = (STAGE_HEART, STAGE_AORTA, STAGE_LESION)


@dataclass(frozen=True)
class OrganView:
    """An organ as render_chest drew it, for the kinds drawn with it (``STAGE_HEART`` / ``STAGE_AORTA``)."""

    box: tuple[slice, ...]  # the organ's sub-box of the grid (Z, Y, X)
    coords: tuple[np.ndarray, np.ndarray, np.ndarray]  # broadcastable z, y, x mm inside ``box``
    mask: np.ndarray  # bool, the organ inside ``box``
    grown: Callable[[float], np.ndarray]  # d mm -> the organ's mask grown by d (negative: shrunk)


def fill(hu, lab, sl, mask, value, label=None):
    """Write ``value`` (and ``label``) where ``mask`` inside the sub-box ``sl``."""
    if mask is None or not mask.any():
        return
    h = hu[sl]
    h[mask] = value if np.ndim(value) == 0 else np.broadcast_to(value, mask.shape)[mask]
    if label is not None:
        lab[sl][mask] = label


def sphere_box(grid: Grid, c, r):
    """Index slices of the grid covering the ball of radius ``r`` mm around ``c`` (z, y, x mm)."""
    return grid.box((c[0] - r, c[1] - r, c[2] - r), (c[0] + r, c[1] + r, c[2] + r))


def _draw_findings(a: Anatomy, grid: Grid, hu, lab, stage: str, organ: OrganView | None, masks: dict) -> None:
    """Draw the findings whose kind is drawn at ``stage``; record (sub-box, mask) of each in ``masks``."""
    for i, f in enumerate(a.findings):
        kind = _kind_of(f)
        if kind.stage == stage:
            m = kind.draw(a, grid, hu, lab, f, organ)
            if m is not None:
                masks[i] = m


@dataclass(frozen=True)
class _Section:
    """The z-invariant body section on the grid: 2D maps shared by the organs."""

    z1: np.ndarray  # (Z,) mm
    y2: np.ndarray  # (Y, 1) mm
    x2: np.ndarray  # (1, X) mm
    rho2: np.ndarray  # (Y, X) squared normalised body radius
    body: np.ndarray  # (Y, X) inside the skin
    inner: np.ndarray  # (Y, X) inside the rib cage
    cage_in: float  # rho2 of the rib cage's inner surface


def render_chest(a: Anatomy, grid: Grid, finding_masks: bool = False):
    """Render HU (float32) and TotalSegmentator label ids (uint8), both (Z, Y, X) canonical.

    Args:
        a: anatomy with its findings.
        grid: target grid.
        finding_masks: also return {finding index: bool (Z, Y, X)} of each localized finding.

    Returns:
        (hu, labels, masks) with masks {} unless ``finding_masks``.
    """
    hu, lab, sec = _render_body_wall(a, grid)
    _render_abdomen(a, hu, lab, sec)
    _render_lungs(a, grid, hu, lab)
    masks: dict[int, tuple] = {}  # finding index -> (sub-box, mask), in the order they are drawn
    _render_heart(a, grid, hu, lab, masks)
    _render_aorta(a, grid, hu, lab, sec, masks)
    _render_airway_and_esophagus(a, hu, lab, sec)
    _render_spine(a, hu, lab, sec)
    _render_ribs_and_sternum(a, grid, hu, lab, sec)
    _draw_findings(a, grid, hu, lab, STAGE_LESION, None, masks)
    if not finding_masks:
        return hu, lab, {}
    full = {}
    for i, (sl, m) in masks.items():
        mm = np.zeros(grid.shape, bool)
        mm[sl] = m
        full[i] = mm
    return hu, lab, full


def _render_body_wall(a: Anatomy, grid: Grid):
    """HU of air, subcutaneous fat, chest-wall muscle and mediastinal fat; empty labels; the section maps."""
    Z, Y, X = grid.shape
    z, y, x = grid.coords()
    y2, x2 = y[0], x[0]  # (Y,1), (1,X)
    rho2 = _body_rho2(a, y2, x2)
    body = rho2 <= 1.0
    fat_in = (1.0 - a.fat / a.ay) ** 2
    cage_in = (1.0 - (a.fat + CAGE_WALL) / a.ay) ** 2
    muscle = (rho2 < fat_in) & (rho2 >= cage_in)
    inner = rho2 < cage_in
    tissue2d = np.full((Y, X), -1000.0, np.float32)
    tissue2d[body] = -95.0  # subcutaneous fat
    tissue2d[muscle] = 45.0
    tissue2d[inner] = -70.0  # mediastinal fat
    hu = np.broadcast_to(tissue2d, (Z, Y, X)).copy()
    lab = np.zeros((Z, Y, X), np.uint8)
    return hu, lab, _Section(z[:, 0, 0], y2, x2, rho2, body, inner, cage_in)


def _render_abdomen(a: Anatomy, hu, lab, sec: _Section) -> None:
    """Upper abdomen below the diaphragm: liver on the right, stomach (with its gas) on the left."""
    y2, x2 = sec.y2, sec.x2
    z = sec.z1[:, None, None]
    dz = diaphragm_z(a, y2, x2)  # (Y, X)
    below = (z < dz[None]) & sec.inner[None]
    liver = below & (x2 > -0.05 * a.ax)[None]
    fill(hu, lab, (slice(None),) * 3, below, 30.0, STOMACH)
    fill(hu, lab, (slice(None),) * 3, liver, 58.0, LIVER)
    gas = below & ~liver & (z > dz[None] - 25.0) & (y2 > 0.1 * a.ay)[None] & (x2 < -0.25 * a.ax)[None]
    fill(hu, lab, (slice(None),) * 3, gas, -990.0)


def _render_lungs(a: Anatomy, grid: Grid, hu, lab) -> None:
    """Lungs by lobe with a gravity gradient, pulmonary vessels and the main bronchi."""
    lsl = grid.box((a.z_base - 1, -a.ay, -a.ax), (a.z_apex + 1, a.ay, a.ax))
    lz, ly, lx = grid.coords(lsl)
    lobes = lobe_at(a, lz, ly, lx)
    lung = lobes > 0
    lung_hu = (-855.0 - 0.35 * ly).astype(np.float32)  # posterior (dependent) lung slightly denser
    fill(hu, lab, lsl, lung, lung_hu)
    lab[lsl][lung] = lobes[lung]

    # Pulmonary vessels (part of the lobes in TotalSegmentator, so labels stay).
    for p0, p1, r in a.vessels:
        vsl = grid.box(tuple(min(u, v) - r for u, v in zip(p0, p1)), tuple(max(u, v) + r for u, v in zip(p0, p1)))
        vz, vy, vx = grid.coords(vsl)
        fill(hu, lab, vsl, capsule_at(vz, vy, vx, p0, p1, r) & np.isin(lab[vsl], LUNG_IDS), 35.0)

    # Main bronchi: air tubes from the carina into each hilum (image only).
    zc = a.z_carina
    for side in (1, -1):
        p1 = (zc - 35.0, a.trachea_y - 8.0, side * 0.30 * a.ax)
        bsl = grid.box((p1[0] - 8, a.trachea_y - 20, min(0, p1[2]) - 8), (zc + 8, a.trachea_y + 8, max(0, p1[2]) + 8))
        bz, by, bx = grid.coords(bsl)
        fill(hu, lab, bsl, capsule_at(bz, by, bx, (zc, a.trachea_y, 0.0), p1, 0.62 * a.trachea_r), -990.0)


def _render_heart(a: Anatomy, grid: Grid, hu, lab, masks: dict) -> None:
    """The heart, after the findings drawn with it (pericardial fluid around it)."""
    hsl = sphere_box(grid, a.heart_c, max(a.heart_radii()) + a.heart_pad() + 1)
    hz, hy, hx = grid.coords(hsl)
    heart = heart_at(a, hz, hy, hx)
    organ = OrganView(hsl, (hz, hy, hx), heart, lambda d: heart_at(a, hz, hy, hx, pad=d))
    _draw_findings(a, grid, hu, lab, STAGE_HEART, organ, masks)
    fill(hu, lab, hsl, heart, 42.0, HEART)


def _render_aorta(a: Anatomy, grid: Grid, hu, lab, sec: _Section, masks: dict) -> None:
    """Aorta (ascending, arch, descending through the diaphragm), then the findings of its wall."""
    z_low = float(sec.z1[0]) - 5.0
    lo = (z_low, min(a.aorta_desc_xy[1], a.aorta_asc_xy[1]) - a.aorta_r, a.aorta_desc_xy[0] - a.aorta_r)
    hi = (a.z_arch + 8 + a.aorta_r, a.aorta_asc_xy[1] + a.aorta_r, a.aorta_asc_xy[0] + a.aorta_r)
    asl = grid.box(lo, hi)
    az, ay, ax = grid.coords(asl)
    aorta = aorta_at(a, az, ay, ax, z_low)
    fill(hu, lab, asl, aorta, 40.0, AORTA)
    organ = OrganView(asl, (az, ay, ax), aorta, lambda d: aorta_at(a, az, ay, ax, z_low, r=a.aorta_r + d))
    _draw_findings(a, grid, hu, lab, STAGE_AORTA, organ, masks)


def _render_airway_and_esophagus(a: Anatomy, hu, lab, sec: _Section) -> None:
    """Trachea down to the carina, esophagus all the way."""
    z1, y2, x2 = sec.z1, sec.y2, sec.x2
    tz = z1 >= a.z_carina
    tr2 = (x2 / a.trachea_r) ** 2 + ((y2 - a.trachea_y) / a.trachea_r) ** 2 <= 1.0
    fill(hu, lab, (slice(None),) * 3, tz[:, None, None] & tr2[None], -1000.0, TRACHEA)
    ex, ey = a.esophagus_xy
    es2 = ((x2 - ex) / 9.0) ** 2 + ((y2 - ey) / 7.0) ** 2 <= 1.0
    es3 = (z1 > a.z_base - 10.0)[:, None, None] & es2[None]
    fill(hu, lab, (slice(None),) * 3, es3, 35.0, ESOPHAGUS)


def _render_spine(a: Anatomy, hu, lab, sec: _Section) -> None:
    """Vertebral bodies (trabecular + cortex) and posterior elements, labelled by level; discs between."""
    z1, y2, x2, body = sec.z1, sec.y2, sec.x2, sec.body
    level = np.floor((a.z_apex + 22.0 - z1) / a.level_h)
    frac = (a.z_apex + 22.0 - z1) / a.level_h - level
    disc = (frac < 0.16)[:, None, None]
    vid = np.clip(VERTEBRA_T1 - level, 27, 50).astype(np.uint8)[:, None, None]
    d2 = x2**2 + (y2 - a.spine_y) ** 2
    body_v = d2 <= a.spine_r**2
    cortex = body_v & (d2 >= (a.spine_r - 3.0) ** 2)
    post = ((x2 / 9.0) ** 2 + ((y2 - (a.spine_y - a.spine_r - 16.0)) / 16.0) ** 2 <= 1.0) & body
    post |= ((np.abs(x2) - 14.0) ** 2 / 49.0 + ((y2 - (a.spine_y - a.spine_r - 4.0)) / 6.0) ** 2 <= 1.0) & body
    bone2 = body_v | post
    vhu = np.where(cortex | post, 750.0, 260.0).astype(np.float32)
    vmask = bone2[None] & ~disc
    hu[vmask] = np.broadcast_to(vhu, hu.shape)[vmask]
    lab[vmask] = np.broadcast_to(vid, lab.shape)[vmask]
    hu[bone2[None] & disc & body_v[None]] = 80.0


def _render_ribs_and_sternum(a: Anatomy, grid: Grid, hu, lab, sec: _Section) -> None:
    """One rib band per level in the chest wall, left/right numbered 1..12; the sternum in front."""
    z, y, _ = grid.coords()
    z1, y2, x2, rho2, cage_in = sec.z1, sec.y2, sec.x2, sec.rho2, sec.cage_in
    rib_ring = (rho2 < (1.0 - (a.fat + 10.0) / a.ay) ** 2) & (rho2 >= cage_in) & (np.abs(x2) > 26.0) & (y2 < 0.6 * a.ay)
    # Ribs slope down from the spine to the front (~0.6 mm per mm), so an axial slice cuts arcs.
    rib_phase = (a.z_apex + 22.0 - z + 0.6 * (y - a.spine_y)) / a.level_h  # (Z, Y, 1)
    rib_level = np.floor(rib_phase)
    rib_frac = rib_phase - rib_level
    rib_z = (rib_frac > 0.35) & (rib_frac < 0.35 + 10.0 / a.level_h) & (rib_level >= 0) & (rib_level < 12)
    rib3 = rib_z & rib_ring[None]
    rib_id = np.where(x2 > 0, RIB_RIGHT_1, RIB_LEFT_1)[None] + np.clip(rib_level, 0, 11).astype(np.int64)
    hu[rib3] = 600.0
    lab[rib3] = np.broadcast_to(rib_id, lab.shape)[rib3].astype(np.uint8)
    stern2 = (rho2 < (1.0 - (a.fat + 6.0) / a.ay) ** 2) & (rho2 >= cage_in) & (np.abs(x2) <= 16.0) & (y2 > 0)
    stern3 = ((z1 < a.z_apex - 10.0) & (z1 > a.heart_c[0] - 20.0))[:, None, None] & stern2[None]
    fill(hu, lab, (slice(None),) * 3, stern3, 450.0, STERNUM)


def render_head(grid: Grid, center_z: float):
    """A non-chest volume: skull shell and brain, no lungs (for the non-chest fault)."""
    z, y, x = grid.coords()
    r2 = ((z - center_z) / 85.0) ** 2 + (y / 95.0) ** 2 + (x / 75.0) ** 2
    hu = np.full(grid.shape, -1000.0, np.float32)
    lab = np.zeros(grid.shape, np.uint8)
    skull = r2 <= 1.0
    brain = r2 <= 0.8
    hu[skull] = 900.0
    lab[skull] = SKULL
    hu[brain] = 35.0
    lab[brain] = BRAIN
    return hu, lab
