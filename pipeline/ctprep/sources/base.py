"""What a dataset layout must provide to the pipeline, and how a source is looked up.

A *source* knows one on-disk layout (CT-RATE, OmniAbnorm-CT). It does two
things and nothing else:

* ``scan(root)`` (driver, cheap): list the cases found under ``root`` as
  JSON-able :class:`CaseInput` records, plus :class:`Quarantine` records for
  inputs that are unusable already at this point (unsafe names, missing
  metadata rows, ...).
* ``load(case)`` (worker, per case): read the raw arrays of one case into a
  :class:`LoadedCase` in the file's own voxel order, with the affine that
  maps that voxel order to RAS+ millimetres. Raise
  :class:`~ctprep.quarantine.QuarantineError` for a bad case.

Geometry (reorientation, resampling, cropping) is *not* the source's job: the
resample stage does it the same way for every source.

The sources are a fixed list, ``ctprep.sources.SOURCES`` (name -> class; the package
imports its source modules explicitly). :func:`get_source`, :func:`detect_source` and
:func:`available_sources` read it, so ``get_source("omniabnorm")`` works without the
caller importing anything. A new source is a module plus its line in ``SOURCES``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ctprep.quarantine import Quarantine, QuarantineError  # re-exported for sources

if TYPE_CHECKING:
    from ctprep.config import PipelineConfig

__all__ = [
    "CaseInput",
    "LoadedCase",
    "Quarantine",
    "QuarantineError",
    "Source",
    "register_source",
    "get_source",
    "detect_source",
    "available_sources",
    "OUTPUT_MARKER",
    "is_pipeline_output",
    "input_files",
]

# A file that marks a folder as a ctprep output (``--out``, ``--work``): written by the build's
# lock (``ctprep.lock``). Source walks never descend into such a folder, so an ``--out`` inside
# ``--src`` is never read as input (its quarantine.jsonl is not a CoT file, its zarr not a volume).
OUTPUT_MARKER = ".ctprep.lock"


def is_inside(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    """True if ``path`` is ``folder`` or lies below it (lexically; resolve both first if links matter)."""
    from pathlib import PurePath

    try:
        PurePath(path).relative_to(PurePath(folder))
        return True
    except ValueError:
        return False


def is_pipeline_output(folder: str | os.PathLike[str]) -> bool:
    """True if ``folder`` is a ctprep output or work folder (it holds ``OUTPUT_MARKER``)."""
    return os.path.exists(os.path.join(folder, OUTPUT_MARKER))


def _not_regular(path: str) -> str | None:
    """None for a regular file (links resolved), else what it is ("a FIFO", "a broken link", ...)."""
    try:
        mode = os.stat(path).st_mode  # follows links; never opens the file (a FIFO would block)
    except OSError as e:
        return "a broken link" if os.path.islink(path) else f"not readable ({e.strerror})"
    if stat.S_ISREG(mode):
        return None
    for test, what in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return what
    return "not a regular file"


def input_files(root: str | os.PathLike[str], suffixes: tuple[str, ...]) -> Iterator[tuple[str, str | None]]:
    """``(path, problem)`` for every file under ``root`` whose name ends with one of ``suffixes``,
    in sorted order; ``problem`` is None for a regular file (symlinks to regular files anywhere
    are fine, e.g. a Hugging Face cache), else what the entry is (a FIFO, a device, a broken link).

    Folders that are ctprep outputs (:func:`is_pipeline_output`) are skipped; symlinked folders
    are not followed.
    """
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not is_pipeline_output(os.path.join(dirpath, d)))
        for name in sorted(filenames):
            if name.endswith(suffixes):
                path = os.path.join(dirpath, name)
                yield path, _not_regular(path)


@dataclass
class CaseInput:
    """One case as found by ``Source.scan``. JSON-able (it is stored in the
    manifest and shipped to Dask workers).

    Attributes:
        case_id: file-name stem, validated with ``ctprep.schema.is_safe_case_id``
            before it is ever used as a path.
        source: source name, a key of ``ctprep.sources.SOURCES`` ("ctrate" | "omniabnorm").
        split: "train" | "valid" | ... (CT-RATE "validation" is normalised to "valid").
        files: role -> absolute path. Roles used so far: "image" (volume),
            "mask" (label map); OmniAbnorm may add "context_<k>", "mask_<id>".
        meta: the joined metadata row(s), JSON-able (CT-RATE: the metadata CSV
            row with its original column names).
        text: {"findings": str, "impression": str, "report": str,
            "steps": [str], ...source extras}. Empty strings when absent.
        labels: 18 ints in ``ctprep.schema.ABNORMALITY_LABELS`` order, -1 unknown.
        provenance: JSON-able record of *where* the inputs came from and why (which
            copy of a duplicated volume was taken, which mask tree, which side
            files had a row). Stored in the manifest and shown by ``ctprep
            inventory``; no stage key reads it, so moving or adding copies of a
            dataset never reruns work whose inputs did not change.
    """

    case_id: str
    source: str
    split: str
    files: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    text: dict[str, Any] = field(default_factory=dict)
    labels: list[int] = field(default_factory=lambda: [-1] * 18)
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> CaseInput:
        return cls(
            case_id=obj["case_id"],
            source=obj["source"],
            split=obj["split"],
            files=dict(obj.get("files", {})),
            meta=dict(obj.get("meta", {})),
            text=dict(obj.get("text", {})),
            labels=list(obj.get("labels", [-1] * 18)),
            provenance=dict(obj.get("provenance", {})),
        )


@dataclass
class LoadedCase:
    """Raw arrays of one case, as read by ``Source.load``.

    Attributes:
        image: HU values, float32 or int16, in the *file's* voxel order (i, j, k)
            (nibabel order; for a 2D source: (row-as-i, col-as-j, slice-as-k) or
            whatever ``affine`` says). Never float64 (memory: a 300x512x512
            volume is 630 MB in float64).
        labels: label-ids on the same voxel grid as ``image`` (uint8/int16), or None.
        affine: 4x4 float64, voxel (i, j, k) of ``image`` -> RAS+ mm (nibabel convention).
        header_style: "v1" (raw values + metadata CSV: slope/intercept/spacing
            applied by the loader), "v2" (HU + real header) or "jpg".
        label_space: "totalseg" (ids remapped to coarse regions by the
            ``RegionsConfig`` mapping) or "coarse" (already 0..R region ids).
        info: JSON-able extras to record (e.g. which slope/intercept was applied).
    """

    image: np.ndarray
    labels: np.ndarray | None
    affine: np.ndarray
    header_style: str
    label_space: str = "totalseg"
    info: dict[str, Any] = field(default_factory=dict)


class Source:
    """Base class for a dataset layout (see the module docstring).

    Subclasses set ``name`` and implement ``detect``, ``scan`` and ``load``.
    ``config`` (the full pipeline config) is given at construction so that a
    source can read its own slice (e.g. ``config.omni``); it may be None in
    tests that only scan.
    """

    name: ClassVar[str] = ""

    def __init__(self, config: PipelineConfig | None = None):
        self.config = config

    @classmethod
    def detect(cls, root: Path) -> bool:
        """True if ``root`` looks like this layout (cheap: a few stats/listdirs)."""
        raise NotImplementedError

    def scan(self, root: Path) -> tuple[list[CaseInput], list[Quarantine]]:
        """List the cases under ``root`` (driver side; no volume decoding)."""
        raise NotImplementedError

    def load(self, case: CaseInput) -> LoadedCase:
        """Read one case's arrays (worker side). Raise ``QuarantineError`` for bad input."""
        raise NotImplementedError

    @classmethod
    def cot_case_id(cls, record: dict[str, Any]) -> str | None:
        """The case id a CoT JSONL record names (``ctprep.sources.cot``), None if it names none.

        Default: the first non-empty of ``id``, ``case_id``, ``case``, ``VolumeName``, as is.
        """
        value = next((record[k] for k in ("id", "case_id", "case", "VolumeName") if record.get(k)), None)
        return None if value is None else str(value)

    def target_grid(self, case: CaseInput, config: PipelineConfig) -> tuple[tuple[float, float, float], tuple[int, int, int]]:
        """Output (spacing_zyx mm, shape_zyx voxels) for this case's resample.

        Default: ``config.resample``. A source with another kind of volume
        (OmniAbnorm's thin 2D slabs) overrides this.
        """
        r = config.resample
        return tuple(float(s) for s in r.spacing_zyx), tuple(int(n) for n in r.shape_zyx)


def register_source(cls: type[Source]) -> type[Source]:
    """Class decorator checking that a source class has a name; returns ``cls``.

    Nothing is recorded: the list of sources is ``ctprep.sources.SOURCES``.
    """
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    return cls


def _sources() -> dict[str, type[Source]]:
    # The list lives in the package, which imports the source modules, which import this
    # module: reading it at call time (never at import) keeps that from being a cycle.
    from ctprep.sources import SOURCES

    return SOURCES


def available_sources() -> list[str]:
    """Names of the known sources, sorted."""
    return sorted(_sources())


def get_source(name: str, config: PipelineConfig | None = None) -> Source:
    """Instantiate the source ``name``; unknown names fail with the valid choices."""
    sources = _sources()
    if name not in sources:
        raise ValueError(f"unknown source {name!r}; available: {', '.join(sorted(sources))}")
    return sources[name](config)


def detect_source(root: str | Path) -> str:
    """Name of the single source whose layout ``root`` matches.

    Raises ValueError when none or several match (then pass ``--source``).
    """
    sources = _sources()
    root = Path(root)
    hits = [name for name, cls in sorted(sources.items()) if cls.detect(root)]
    if len(hits) != 1:
        what = "no known layout" if not hits else f"several layouts ({', '.join(hits)})"
        raise ValueError(f"{root}: {what} detected; pass --source with one of: {', '.join(sorted(sources))}")
    return hits[0]
