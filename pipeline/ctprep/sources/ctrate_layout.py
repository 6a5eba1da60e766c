"""Where the files of a CT-RATE download are: image folders, their release, mask trees.

CT-RATE is used in several on-disk layouts, all read by one walk:

* **release** (as downloaded)::

      dataset/train/train_1/train_1_a/train_1_a_1.nii.gz        first release (v1): raw values, blank header
      dataset/train_fixed/train_1/train_1_a/train_1_a_1.nii.gz  corrected release (v2): HU, real header
      dataset/valid/..., dataset/valid_fixed/...
      dataset/ts_seg/<task>/train_fixed/train_1/train_1_a/train_1_a_1.nii.gz
                                                                TotalSegmentator outputs; ts_total is the
                                                                117-label anatomy map, other tasks
                                                                (ts_lung_nodules, ...) mean other things

  Many users have both image folders, many only ``*_fixed``.
* **flat** (``ctprep demo-data``'s default): v1 and v2 files mixed in ``train/`` and
  ``valid/``, label maps under ``masks/`` mirroring the volume tree.
* **any mask tree given explicitly** (``--masks NAME=DIR``, ``ctrate.mask_dirs``), e.g.
  MedSAM2 outputs, inside or outside the source root.

Rules:

* A ``.nii(.gz)`` is a **mask** if it lies under ``ts_seg/<task>/`` (tree ``<task>``), under
  a folder named ``masks``/``mask``/``seg``/``segmentations``/``labels_masks`` or ending in
  ``_mask``/``_masks`` (tree named after that folder, a leading split name dropped:
  ``train_mask`` -> ``mask``), or under a configured mask folder. Masks are never images.
* Every other ``.nii(.gz)`` is an **image copy** of the case named by its file stem. Its
  *kind* is ``fixed`` when a folder on its path ends in ``_fixed``; ``original`` when its
  split folder (``train``, ``valid``, ...) has a ``<name>_fixed`` sibling (so it is the first
  release of a download that has both); else ``plain`` (a layout that is neither).
* One copy per case is used (:func:`choose_copy`): the only copy; else the one of the
  preferred kind (``ctrate.prefer``: ``fixed`` by default), else the one of the other kind.
  Copies of the same kind with identical bytes are one copy (a re-delivery; the path that sorts
  last is read, all are listed in the case's provenance); two *different* files of the same kind
  are a real conflict: quarantined as ``duplicate_case``.
* A case's mask in a tree is the file with the same stem; where a tree holds several (masks
  made for both releases), the one whose kind matches the chosen image wins.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ctprep.sources.base import input_files, is_inside

NII_SUFFIXES = (".nii.gz", ".nii")
SIDE_SUFFIXES = (".csv", ".jsonl")  # metadata / report / label tables, CoT records
MASK_DIR_NAMES = {"masks", "mask", "segmentations", "seg", "labels_masks"}
TS_SEG_DIR = "ts_seg"
ANATOMY_DEFAULTS = ("ts_total", "masks")  # "auto" anatomy tree, in order of preference
SPLIT_DIRS = {"train", "valid", "validation", "val", "test"}
KINDS = ("fixed", "original", "plain")


def strip_nii(name: str) -> str | None:
    """``train_1_a_1.nii.gz`` -> ``train_1_a_1``; None if not a NIfTI name."""
    for suf in NII_SUFFIXES:
        if name.endswith(suf):
            return name[: -len(suf)]
    return None


@dataclass
class ImageCopy:
    """One image file of a case."""

    path: Path  # absolute
    rel: str  # relative to the source root (posix)
    folder: str  # the image folder it belongs to, relative to the root (e.g. "train_fixed")
    kind: str  # fixed | original | plain


@dataclass
class MaskTree:
    """A folder of label maps named like the volumes."""

    name: str
    dir: Path  # absolute
    files: dict[str, list[Path]] = field(default_factory=lambda: defaultdict(list))  # stem -> paths


@dataclass
class Layout:
    """What one walk of a CT-RATE root found."""

    root: Path
    images: dict[str, list[ImageCopy]] = field(default_factory=lambda: defaultdict(list))  # stem -> copies
    trees: dict[str, MaskTree] = field(default_factory=dict)
    folders: dict[str, str] = field(default_factory=dict)  # image folder -> kind
    # stem -> [(path, what it is)] for entries that are not regular files (FIFO, device, broken
    # link): never opened, since reading a FIFO or /dev/zero would hang or never end.
    irregular: dict[str, list[tuple[Path, str]]] = field(default_factory=lambda: defaultdict(list))
    # (path, problem) of the CSV / JSONL side tables met on the same walk, in walk order: the
    # tables are read from this list, so a 50k-volume tree is listed once, not once per suffix.
    side_files: list[tuple[str, str | None]] = field(default_factory=list)

    def rel(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def anatomy_tree(self, wanted: str = "auto") -> str | None:
        """Name of the tree that drives regions (None: no tree at all).

        Raises ValueError for a configured name that is not there, or for "auto" with several
        trees none of which is a known anatomy map.
        """
        if wanted != "auto":
            if wanted not in self.trees:
                raise ValueError(f"{self.root}: anatomy mask tree {wanted!r} not found; mask trees found: "
                                 f"{sorted(self.trees) or 'none'} (set --masks NAME=DIR or ctrate.anatomy_masks)")
            return wanted
        for name in ANATOMY_DEFAULTS:
            if name in self.trees:
                return name
        if len(self.trees) == 1:
            return next(iter(self.trees))
        if not self.trees:
            return None
        raise ValueError(f"{self.root}: several mask trees ({', '.join(sorted(self.trees))}) and none is a known "
                         "anatomy map; name one with --anatomy-masks NAME or ctrate.anatomy_masks")

    def mask_for(self, tree: str, stem: str, kind: str) -> Path | None:
        """The case's file in ``tree``: the only one, else the one whose release matches ``kind``."""
        paths = self.trees[tree].files.get(stem) or []
        if len(paths) <= 1:
            return paths[0] if paths else None
        for p in paths:
            if _path_kind(p) == kind:
                return p
        return paths[0]


def _path_kind(path: Path) -> str:
    return "fixed" if any(part.endswith("_fixed") for part in path.parts[:-1]) else "other"


def _mask_tree_name(parts: tuple[str, ...]) -> tuple[str, int] | None:
    """(tree name, number of leading parts that form the tree folder) for a mask path, else None."""
    for i, part in enumerate(parts):
        low = part.lower()
        if low == TS_SEG_DIR and i + 1 < len(parts):
            return parts[i + 1], i + 2
        if low in MASK_DIR_NAMES or low.endswith(("_mask", "_masks")):
            head, sep, tail = low.partition("_")
            name = tail if sep and head in SPLIT_DIRS and tail else part
            return name, i + 1
    return None


def _image_folder(parts: tuple[str, ...], root: Path) -> tuple[str, str]:
    """(folder relative to root, kind) of an image whose parent folders are ``parts``."""
    for i, part in enumerate(parts):
        low = part.lower()
        if low.endswith("_fixed"):
            return "/".join(parts[: i + 1]), "fixed"
        if low in SPLIT_DIRS:
            sibling = root.joinpath(*parts[:i], part + "_fixed")
            return "/".join(parts[: i + 1]), "original" if sibling.is_dir() else "plain"
    return ("/".join(parts[:1]) or "."), "plain"


def walk_layout(root: str | Path, mask_dirs: dict[str, str] | None = None) -> Layout:
    """Walk ``root`` once and sort every NIfTI file into image copies and mask trees.

    Args:
        root: the source root (a CT-RATE ``dataset/`` folder or any folder above the volumes).
        mask_dirs: extra mask trees, name -> folder (absolute or relative to ``root``).
    """
    root = Path(root).resolve()
    out = Layout(root)
    explicit: list[tuple[Path, str]] = []
    for name, folder in sorted((mask_dirs or {}).items()):
        d = Path(folder)
        d = (d if d.is_absolute() else root / d).resolve()
        if not d.is_dir():
            raise ValueError(f"mask tree {name!r}: {d} is not a folder")
        explicit.append((d, name))
        out.trees[name] = MaskTree(name, d)
    walked = [(root, None)] + [(d, name) for d, name in explicit if not is_inside(d, root)]
    for top, fixed_tree in walked:
        for name_str, problem in input_files(top, NII_SUFFIXES + SIDE_SUFFIXES):
            if name_str.endswith(SIDE_SUFFIXES):
                if fixed_tree is None:
                    out.side_files.append((name_str, problem))
                continue
            path = Path(name_str)
            stem = strip_nii(path.name)
            tree_here = fixed_tree or next((name for d, name in explicit if is_inside(path.parent, d)), None)
            if problem is not None:
                if tree_here is None and _mask_tree_name(path.relative_to(root).parts[:-1]) is None:
                    out.irregular[stem].append((path, problem))
                continue
            if tree_here is not None:
                out.trees[tree_here].files[stem].append(path)
                continue
            parts = path.relative_to(root).parts[:-1]
            found = _mask_tree_name(parts)
            if found is not None:
                name, n = found
                tree = out.trees.setdefault(name, MaskTree(name, root.joinpath(*parts[:n])))
                tree.files[stem].append(path)
                continue
            folder, kind = _image_folder(parts, root)
            out.folders.setdefault(folder, kind)
            out.images[stem].append(ImageCopy(path, path.relative_to(root).as_posix(), folder, kind))
    return out


def _same_bytes(a: Path, b: Path) -> bool:
    import filecmp

    try:  # sizes first: different volumes almost always differ in size, and then nothing is read
        return a.stat().st_size == b.stat().st_size and filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def collapse_identical(copies: list[ImageCopy]) -> tuple[list[ImageCopy], str]:
    """``copies`` with byte-identical files of the same kind kept once (the path that sorts last:
    a re-delivery), and a note naming what was collapsed ("" if nothing)."""
    by_kind: dict[str, list[ImageCopy]] = defaultdict(list)
    for c in copies:
        by_kind[c.kind].append(c)
    kept: list[ImageCopy] = []
    notes = []
    for kind, group in by_kind.items():
        group = sorted(group, key=lambda c: c.rel)
        last = group[-1]
        if len(group) > 1 and all(_same_bytes(c.path, last.path) for c in group[:-1]):
            notes.append(f"{len(group)} identical {kind} copies, {last.rel} read")
            kept.append(last)
        else:
            kept += group
    return kept, "; ".join(notes)


def choose_copy(copies: list[ImageCopy], prefer: str) -> tuple[ImageCopy | None, str]:
    """(the copy to use, the rule that chose it), or (None, why) for a real conflict.

    Copies of one kind with the same bytes are one copy (:func:`collapse_identical`): a volume
    delivered again in another folder is the same case, not a conflict.

    Args:
        copies: every image file found for one case id.
        prefer: "fixed" | "original": the release to take when a case is in both.
    """
    if len(copies) > 1:
        kept, note = collapse_identical(copies)
        if note:
            chosen, rule = choose_copy(kept, prefer)
            return chosen, f"{note}; {rule}"
    if len(copies) == 1:
        return copies[0], "only copy"
    by_kind: dict[str, list[ImageCopy]] = defaultdict(list)
    for c in copies:
        by_kind[c.kind].append(c)
    other = "original" if prefer == "fixed" else "fixed"
    for kind in (prefer, other):
        group = by_kind.get(kind, [])
        if len(group) == 1 and set(by_kind) <= {"fixed", "original"}:
            return group[0], f"prefer {kind}" if kind == prefer else f"only {kind} copy ({prefer} preferred)"
        if len(group) > 1:
            break
    return None, f"{len(copies)} volumes share this case id: " + ", ".join(sorted(c.rel for c in copies))
