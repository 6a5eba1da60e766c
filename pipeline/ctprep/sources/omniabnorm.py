"""OmniAbnorm-CT layout: 2D CT slices (JPEG) with per-abnormality masks, read into thin slabs.

Two on-disk layouts are read (``docs/omniabnorm.md`` has the rules in full).

**Release** (OmniAbnorm-CT-14K as published; ``ctprep demo-data --source omniabnorm``
writes it)::

    ROOT/
      axial/axial_train.json, axial/axial_valid.json, axial/*_grouped.json,
      coronal/..., sagittal/..., merged_train.json, ...   JSON files (see release_files: ROOT
                                                          may also hold several such trees)
      <any>/<datum image folder>/0.jpg (or 0.jpeg), -1.jpg, 1.jpg, ...
      <any>/<datum mask folder>/<abnormality id>.jpeg
      *.jsonl, <any>/*.jsonl                              optional CoT records keyed by datum id

Each JSON file is a dict ``{datum id: datum}``; a datum is ``{"image": folder,
"mask": folder, "context": [offsets], "abnormality": [{"id", "group_id",
"label", "description", "rewritten_findings": [str], "category"}]}``
(``_grouped`` files hold ``"abnormality_group": {group_id: [abnormality]}``
instead; normal images have neither). Folder paths are relative to the JSON's
folder or absolute paths of another machine: an absolute path that does not
exist here is re-rooted (its longest tail that exists under ``omni.image_root``,
the JSON's folder or a folder above it up to ROOT). Nothing outside ROOT is read
unless ``omni.image_root`` names it.

Rules (why: see docs/omniabnorm.md):

* **Which file wins** when one datum id is listed in several JSON files: a
  plane file (``axial_train.json``) over its ``_grouped`` variant over a
  ``merged*`` file; among equals the path that sorts last (a re-delivery). The
  others are listed in ``provenance["also_in"]``; never quarantined for it.
* **Case ids**: a datum id that ``is_safe_case_id`` accepts is the case id;
  any other maps to ``<id with [^A-Za-z0-9_-] runs as '_'>-<sha1(id)[:10]>``
  (:func:`case_id_for`); ``provenance["datum_id"]`` keeps the original.
* **Plane**: a datum's own ``plane`` field, else the plane named by the JSON
  file or its folder, else a plane word in the image path, else axial
  (``provenance["plane_from"]`` says which). Split: ``train | valid | test``
  from the file name (``val``, ``validation`` -> valid), else train.
* **Missing files**: a missing key slice (``0.jpg`` / ``0.jpeg``) quarantines
  that datum (``unreadable``, naming the file). A missing or undecodable
  context slice or mask file is recorded (``provenance["missing"]``,
  ``LoadedCase.info["missing_context"]`` / ``["missing_masks"]``) and the case
  goes on: a slab position without its slice repeats the nearest slice that
  exists (``info["filled_offsets"]``).
* **Text**: ``findings`` = one sentence per abnormality group (its first
  non-empty ``description``, else its first rewritten finding), ``impression``
  = the groups' labels; a normal image gets no findings and the impression
  :data:`NORMAL_IMPRESSION` (``{plane}`` filled in), so it is trained as a
  normal image rather than quarantined for lack of text.

**CoT** (both layouts): every ``*.jsonl`` at ROOT, up to two folders below it (a CoT-only
delivery folder counts), in the batch folders and beside the release JSON files
(:func:`tree_cot_files`), then ``cot.files`` (``--cot``), merged per case by the rule of
:mod:`ctprep.sources.cot` (steps keyed by step number, later files win) whichever batch or JSON
file delivered the case; a record names a datum id or a case id. Into ``text``: ``steps`` (strings
in step order), ``cot_findings``, ``cot_impression``; ``provenance["cot"]`` says which file and line.

**Batches** (the older layout, still read)::

    ROOT/batch_01/records.json   list of records (any *.json holding a list of records works)
    ROOT/batch_01/cot.jsonl      {"id", "steps": [str | {"step", "text"}], "findings", "impression"}
    ROOT/batch_01/<id>/0.jpg, -2.jpg .. 2.jpg, mask_<n>.jpeg

with records ``{"id", "image", "context": [paths], "mask": [paths],
"abnormality": [...], "windows", "modality"}``, paths relative to the batch
folder; if two batches hold the same id the batch that sorts last wins.

What a case becomes (``load``), for both layouts:

* **image**: the key slice and the listed context offsets nearest to it
  (``OmniConfig.slab_depth`` in all), ordered by offset, as a thin slab. JPEG
  gray values are mapped back to approximate HU by inverting the datum's
  ``windows`` (release JSONs carry none: ``DEFAULT_WINDOW``), ``hu = v / 255 *
  width + center - width / 2``. Spacing is nominal (a JPEG carries none):
  ``omni.slice_spacing_mm`` per offset step, ``omni.pixel_spacing_mm`` in plane.
* **slab frame and planes**: every slab is stored as (slice, row, column) =
  (``slab_depth``, H, W), so that axial, coronal and sagittal slabs share one
  grid and one patch layer. The affine returned by ``load`` is the *slab
  frame*: the axial one of the radiological view (column -> patient left, row ->
  posterior, offset -> superior). For an axial image that is the patient; for a
  coronal image (rows superior -> inferior, columns patient right -> left,
  offsets along anterior) and a sagittal one (rows superior -> inferior,
  columns anterior -> posterior, offsets along patient right) the patient
  position of a slab-frame point is ``PATIENT_FROM_SLAB[plane] @ point``,
  recorded as ``info["patient_from_slab"]`` (zarr attrs ``input``) together
  with ``info["plane"]``. So the stored (z, y, x) axes point (S, A, R) for
  axial, (A, S, R) for coronal and (R, S, A) for sagittal slabs; the true
  affine of a stored slab is ``patient_from_slab @ attrs["affine"]``. (The
  resample stage always stores canonical (S, A, R) axes; a coronal slab stored
  truthfully would be (H, slab_depth, W), which no patch grid with pz < py fits.)
* **mask** (``label_space="coarse"``): on the key slice, each abnormality
  group's masks (one file per abnormality id) carry the coarse region id of the
  group (category, an alias of it, or region keywords in its description; see
  :func:`abnormality_region`); context slices are 0. A normal image has an
  all-zero mask; an abnormal one whose mask files are all missing has none
  (``has_mask`` false), so it is not taken for a case without findings.
* **labels**: 1 for each of the 18 CT-RATE labels that an abnormality's
  ``label`` names (exact name or a listed synonym), -1 for all others (a
  single slice cannot say a finding is absent).

Where the code lives: :mod:`.omniabnorm_release` (release JSON files, folder
resolution, datum -> case), :mod:`.omniabnorm_batches` (the older layout),
:mod:`.omniabnorm_slab` (``load``: slab, mask, affine), :mod:`.omniabnorm_labels`
(labels, regions, windows) and :mod:`.omniabnorm_files` (JSON kind, CoT JSONL,
JPEG reads); this module holds the source class and re-exports their public names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ctprep.quarantine import Quarantine
from ctprep.sources.base import CaseInput, LoadedCase, Source, _not_regular, register_source
from ctprep.sources.cot import configured_cot_files, read_cot, unknown_ids_note
from ctprep.sources.omniabnorm_batches import _is_batch, batch_case, batch_folders, scan_batches
from ctprep.sources.omniabnorm_files import SKIP_JSON, _cot_id, slice_offset
from ctprep.sources.omniabnorm_labels import (
    CATEGORY_REGION,
    DEFAULT_WINDOW,
    LABEL_SYNONYMS,
    NAMED_WINDOWS,
    abnormality_groups,
    abnormality_region,
    datum_abnormalities,
    label_vector,
    parse_window,
    window_to_hu,
)
from ctprep.sources.omniabnorm_release import (
    DATA_FOLDER_SUBDIRS,
    FOLDER_PROBLEMS,
    KEY_SLICE_NAMES,
    MASK_SUFFIXES,
    MAX_JSON_DEPTH,
    NORMAL_IMPRESSION,
    SLICE_SUFFIXES,
    SPLIT_WORDS,
    FolderResolver,
    case_id_for,
    datum_plane,
    file_rank,
    plane_from_name,
    read_datum,
    release_files,
    release_text,
    scan_release,
    split_from_name,
    tree_cot_files,
)
from ctprep.sources.omniabnorm_slab import PATIENT_FROM_SLAB, PLANES, choose_slab_offsets, load_slab, slab_depth

__all__ = [
    "CATEGORY_REGION", "DATA_FOLDER_SUBDIRS", "DEFAULT_WINDOW", "FOLDER_PROBLEMS", "KEY_SLICE_NAMES", "LABEL_SYNONYMS",
    "MASK_SUFFIXES", "MAX_JSON_DEPTH", "NAMED_WINDOWS", "NORMAL_IMPRESSION", "PATIENT_FROM_SLAB", "PLANES",
    "SKIP_JSON", "SLICE_SUFFIXES", "SPLIT_WORDS", "FolderResolver", "OmniAbnormSource", "abnormality_groups",
    "abnormality_region", "batch_case", "batch_folders", "case_id_for", "choose_slab_offsets", "datum_abnormalities",
    "datum_plane", "file_rank", "label_vector", "load_slab", "parse_window", "plane_from_name", "read_datum",
    "release_files", "release_text", "scan_batches", "scan_release", "slice_offset",
    "split_from_name", "tree_cot_files", "window_to_hu",
]


@register_source
class OmniAbnormSource(Source):
    """OmniAbnorm-CT, release JSON files or older batch folders (see module docstring)."""

    name = "omniabnorm"

    @classmethod
    def detect(cls, root: Path) -> bool:
        root = Path(root)
        if not root.is_dir():
            return False
        return (bool(release_files(root)) or _is_batch(root)
                or any(_is_batch(sub) for sub in sorted(root.iterdir()) if sub.is_dir()))

    @staticmethod
    def batches(root: Path) -> list[Path]:
        """Batch folders (older layout) under ``root`` in name order (``root`` itself if it is one batch)."""
        return batch_folders(root)

    def _image_root(self, root: Path) -> Path | None:
        configured = getattr(self.config.omni, "image_root", None) if self.config is not None else None
        if not configured:
            return None
        path = Path(configured).expanduser()
        return (path if path.is_absolute() else root / path).resolve()

    def scan(self, root: Path) -> tuple[list[CaseInput], list[Quarantine]]:
        root = Path(root).resolve()
        found, quarantined = scan_batches(self.batches(root), self.name)
        rel_cases, rel_q = scan_release(root, self.name, self._image_root(root))
        for q in rel_q:
            quarantined[q.case] = q
        for case in rel_cases:
            if case.case_id in found:  # the same id in a batch folder: the release file wins, say so
                case.provenance["replaces_batch"] = found[case.case_id].provenance.get("batch", "")
            found[case.case_id] = case
            quarantined.pop(case.case_id, None)
        for cid in list(quarantined):
            if cid in found:  # a quarantined batch record superseded by a release datum
                quarantined.pop(cid)
        self._merge_cot(root, found, quarantined)
        return [found[c] for c in sorted(found)], [quarantined[c] for c in sorted(quarantined)]

    @classmethod
    def cot_case_id(cls, record: dict[str, Any]) -> str | None:
        """The case of the datum id (or case id) the record names (:func:`case_id_for`)."""
        datum_id = _cot_id(record)
        return case_id_for(datum_id) if datum_id else None

    def _merge_cot(self, root: Path, found: dict[str, CaseInput], quarantined: dict[str, Quarantine]) -> None:
        """Fill the cases' CoT text from every CoT file of the tree and ``cot.files`` (one merge, any batch)."""
        folders = self.batches(root) + sorted({Path(c.provenance["json"]).parent for c in found.values()
                                                if "json" in c.provenance}, key=str)
        tree = [(p, p.relative_to(root).as_posix(), _not_regular(str(p)))
                for p in tree_cot_files(root, [root / f for f in folders])]
        cot = read_cot(tree + configured_cot_files(self.config), self.cot_case_id)
        for case in found.values():
            merged = cot.get(case.case_id)
            if merged is None:
                continue
            case.text.update({"steps": merged.step_texts(), "cot_findings": merged.get("findings"),
                              "cot_impression": merged.get("impression")})
            case.provenance["cot"] = merged.provenance()
        note = unknown_ids_note(cot.ids_of(label for _, label, _ in tree) - set(found) - set(quarantined),
                                "the CoT files under this root")
        # cot.files' own problems are reported once per build (ctprep.sources.cot.delivery_warnings)
        self.problems = cot.problems_of(label for _, label, _ in tree) + ([note] if note else [])

    # -------------------------------------------------------------- worker side
    def slab_offsets(self, case: CaseInput) -> list[int]:
        """Offsets in the slab: the key slice and the listed offsets nearest to it, ascending.

        Listed offsets whose file is missing still take their place (so the slab keeps its
        spacing); :meth:`load` fills them from the nearest slice that exists.
        """
        return choose_slab_offsets(case.meta, slab_depth(self.config))

    def slab_roles(self, case: CaseInput) -> list[str]:
        """Roles of the slices in the slab that have a file, by offset."""
        by_offset = {o: r for r, o in case.meta["offsets"].items()}
        return [by_offset[o] for o in self.slab_offsets(case) if o in by_offset]

    def load(self, case: CaseInput) -> LoadedCase:
        return load_slab(case, self.config)

    def target_grid(self, case: CaseInput, config) -> tuple[tuple[float, float, float], tuple[int, int, int]]:
        """Thin slab, every plane alike (slab frame): ``slab_depth`` slices at the nominal slice
        spacing; in plane, the spacing that fits the whole image (nominal pixel spacing x size)
        into ``shape_yx`` (rows -> y, columns -> x)."""
        o = config.omni
        size = case.meta.get("image_size_hw") or list(o.shape_yx)
        sy = float(o.pixel_spacing_mm) * size[0] / o.shape_yx[0]
        sx = float(o.pixel_spacing_mm) * size[1] / o.shape_yx[1]
        s = max(sy, sx)  # one in-plane spacing: square pixels stay square
        return (float(o.slice_spacing_mm), s, s), (int(o.slab_depth), int(o.shape_yx[0]), int(o.shape_yx[1]))
