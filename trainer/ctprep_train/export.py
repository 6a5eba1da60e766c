"""A self-contained encoder export: everything a new scan and a sentence need, nothing of the run.

    python -m ctprep_train.export runs/NAME --out exports/NAME            # newest complete checkpoint
    python -m ctprep_train.export runs/NAME/checkpoints/step_00000300 --out DIR [--shards DIR]

Folder layout (every file mode 0644)::

    model.safetensors        fp32 weights (``ctprep_train.model.save_pretrained``)
    config.json              CTCLIPConfig incl. the text tower's HF config (``text.hf_config``);
                             ``text.path`` is "." (this folder) when it was a local folder
    preprocessing.json       the pipeline preset the shards were built with (full
                             ``ctprep.config.PipelineConfig``) + a readable summary: orientation,
                             spacing, grid, crop/pad, HU clip, region map, patch grid, code versions
    tokenizer_config.json,   the text tokenizer's own files, byte for byte (so their sha256 is the
    vocab.txt, tokenizer.json identity the shards carry): ``AutoTokenizer.from_pretrained(DIR)`` works
    tokenizer_identity.json  {"name", "hash"} the shards were tokenized with
    training.json            step, shard sources and counts, eval figures (machine-readable card)
    README.md                model card generated from the above

``ctprep_train.inference.load_encoder(DIR)`` reads it; no DeepSpeed, no run folder, no shards, no
``text.path`` of the training machine. The export command starts from the ``encoder/`` that every
complete checkpoint already holds (no DeepSpeed needed). It keeps the preprocessing that export
recorded at training time; ``--shards`` / ``--pipeline-config`` re-derive it (for checkpoints
written before it was recorded).

Where the preprocessing comes from: the shards' ``index.json`` does not record the pipeline
config, the manifest does (``SHARDS/work/manifest.sqlite``, setting ``config``, written by every
``ctprep build-shards``). It is checked against ``index.json`` (patch size, region names) so a
manifest of another build is refused; a build with ``--work`` elsewhere passes
``--pipeline-config`` (preset name or YAML) instead.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import sqlite3
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ctprep.atomic import atomic_path, atomic_write_json, atomic_write_text

PREPROCESSING_FILE = "preprocessing.json"
TRAINING_FILE = "training.json"
TOKENIZER_IDENTITY_FILE = "tokenizer_identity.json"
# Before self-contained exports the identity was written as ``tokenizer.json``; that name belongs to
# Hugging Face's fast-tokenizer file, so it is written only when no tokenizer files could be copied.
LEGACY_IDENTITY_FILE = "tokenizer.json"
CARD_FILE = "README.md"
FILE_MODE = 0o644
DIR_MODE = 0o755
PREPROCESSING_FORMAT = 1
# Stages whose code decides the volume a model sees (their versions are recorded).
PREPROCESS_STAGES = ("resample", "regions")


# --------------------------------------------------------------------------- preprocessing spec


def manifest_path(shards: str | Path) -> Path:
    from ctprep.runner import MANIFEST_FILE, work_dir_for

    return work_dir_for(Path(shards), None) / MANIFEST_FILE


def read_manifest_config(shards: str | Path) -> tuple[dict[str, Any], dict[str, str], list[dict[str, Any]]]:
    """(pipeline config JSON, {stage: code version}, build sources) recorded by ``build-shards``."""
    from ctprep.manifest import Manifest
    from ctprep_train.shard_io import is_remote

    if is_remote(shards):  # a SQLite file is opened locally, never fetched
        raise FileNotFoundError(f"{shards}: shards read from a URL; their build manifest is not fetched: "
                                "pass --pipeline-config PRESET_OR_YAML")
    path = manifest_path(shards)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no build manifest beside the shards (built with --work elsewhere?); "
                                "pass --pipeline-config PRESET_OR_YAML")
    manifest = Manifest(path, readonly=True)
    try:
        config = manifest.get_setting("config")
        sources = manifest.get_setting("sources", []) or []
        rows = manifest.conn.execute(
            "SELECT stage, version FROM stages WHERE status = 'done' GROUP BY stage, version").fetchall()
    finally:
        manifest.close()
    if not config:
        raise ValueError(f"{path}: the manifest records no pipeline config; pass --pipeline-config")
    versions: dict[str, str] = {}
    for stage, version in rows:
        if stage in PREPROCESS_STAGES:
            versions[stage] = version if stage not in versions else f"{versions[stage]},{version}"
    return config, versions, list(sources)


def installed_stage_versions() -> dict[str, str]:
    from ctprep.stages import get_stage

    return {name: str(get_stage(name).version) for name in PREPROCESS_STAGES}


def preprocessing_spec(config_json: dict[str, Any], index: dict[str, Any] | None = None, *,
                       stage_versions: dict[str, str] | None = None, recorded_from: str = "") -> dict[str, Any]:
    """The ``preprocessing.json`` payload for a pipeline config (checked against ``index.json``).

    ``pipeline_config`` is what ``ctprep_train.inference`` rebuilds the config from; the other keys are
    the same facts spelled out for a reader.
    """
    import ctprep
    from ctprep.config import config_from_dict
    from ctprep.schema import CANONICAL_ORIENTATION, SCHEMA_VERSION
    from ctprep.stages.regions import patch_grid

    cfg = config_from_dict(dict(config_json), name=str(config_json.get("name", "custom")))
    r, g = cfg.resample, cfg.regions
    if index is not None:
        problems = []
        if [int(p) for p in index.get("patch_size", [])] != [int(p) for p in g.patch_size_zyx]:
            problems.append(f"patch_size {index.get('patch_size')} != {list(g.patch_size_zyx)}")
        if list(index.get("region_names", [])) != g.names:
            problems.append(f"region_names {index.get('region_names')} != {g.names}")
        if problems:
            raise ValueError(f"the pipeline config ({recorded_from or 'given'}) is not the one the shards were "
                             f"built with: {'; '.join(problems)}")
    return {
        "format": PREPROCESSING_FORMAT,
        "axes": "zyx",
        "orientation": "".join(CANONICAL_ORIENTATION),  # increasing z, y, x = Superior, Anterior, Right
        "spacing_zyx_mm": [float(s) for s in r.spacing_zyx],
        "shape_zyx": [int(s) for s in r.shape_zyx],
        "grid": "edge-aligned (torch align_corners=False), trilinear image, nearest labels",
        "crop_pad": f"centre crop / pad by whole voxels; padding {int(r.pad_hu)} HU, label 0",
        "hu_clip": [int(h) for h in r.hu_clip],
        "pad_hu": int(r.pad_hu),
        "region_names": g.names,
        "region_map": {k: list(v) for k, v in g.regions.items()},  # region -> TotalSegmentator ids
        "patch_size_zyx": [int(p) for p in g.patch_size_zyx],
        "patch_grid_zyx": list(patch_grid(tuple(r.shape_zyx), tuple(g.patch_size_zyx))),
        "pipeline_version": str((index or {}).get("pipeline_version", ctprep.__version__)),
        "schema_version": int((index or {}).get("schema_version", SCHEMA_VERSION)),
        "stage_versions": dict(stage_versions or installed_stage_versions()),
        "recorded_from": recorded_from,
        "pipeline_config": cfg.to_json(),
    }


def data_summary(shards: str | Path, index: dict[str, Any], sources: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """Sample counts per split and source from ``index.json`` (+ the build's source roots)."""
    counts: dict[str, dict[str, int]] = {}
    for split, entries in index.get("splits", {}).items():
        for e in entries:
            src = str(e.get("source", "ctrate"))
            counts.setdefault(split, {})[src] = counts.get(split, {}).get(src, 0) + int(e.get("samples", 0))
    roots = []
    for s in sources:
        root = Path(str(s.get("root", "")))
        # The synthetic generator writes faults.json at every dataset root it makes.
        roots.append({"root": root.name, "source": s.get("source"), "synthetic": (root / "faults.json").is_file()})
    return {
        "shards": Path(shards).name,
        "samples": counts,
        "tokenizer": dict(index.get("tokenizer", {})),
        "pipeline_version": index.get("pipeline_version"),
        "schema_version": index.get("schema_version"),
        "generations": len(index.get("generations", [])),
        "sources": roots,
    }


def export_metadata(shards: str | Path, index: dict[str, Any] | None = None,
                    pipeline_config: str | Path | None = None) -> dict[str, Any]:
    """``{"preprocessing": spec or None, "data": summary, "warnings": [...]}`` for a shards folder.

    Never raises for a missing manifest: the export is then written without ``preprocessing.json``
    (and says so), because training must not stop over it.
    """
    from ctprep.schema import INDEX_FILE
    from ctprep.shards import read_index_if_present
    from ctprep_train.shard_io import as_location

    shards = as_location(str(shards))  # a URL stays a string
    if index is None:
        index = read_index_if_present(shards)
        if index is None:
            raise FileNotFoundError(f"{shards / INDEX_FILE} not found: not a shards folder")
    out: dict[str, Any] = {"preprocessing": None, "data": None, "warnings": []}
    sources: list[dict[str, Any]] = []
    try:
        if pipeline_config is not None:
            from ctprep.config import load_config

            config, versions, where = load_config(pipeline_config).to_json(), None, f"pipeline config {pipeline_config}"
            try:
                _, _, sources = read_manifest_config(shards)
            except (FileNotFoundError, ValueError):
                pass
        else:
            config, versions, sources = read_manifest_config(shards)
            where = f"{Path(shards).name}/work/manifest.sqlite (build-shards setting 'config')"
        out["preprocessing"] = preprocessing_spec(config, index, stage_versions=versions, recorded_from=where)
    except (OSError, ValueError, sqlite3.Error) as err:  # an unreadable manifest must not stop training
        out["warnings"].append(f"no {PREPROCESSING_FILE}: {type(err).__name__}: {err}")
    out["data"] = data_summary(shards, index, sources)
    return out


# --------------------------------------------------------------------------- tokenizer


def read_tokenizer_identity(directory: str | Path) -> dict[str, str] | None:
    """The {"name", "hash"} an export's text was tokenized with (new or legacy file), or None."""
    directory = Path(directory)
    for name in (TOKENIZER_IDENTITY_FILE, LEGACY_IDENTITY_FILE):
        path = directory / name
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except ValueError:
                continue
            if isinstance(data, dict) and "hash" in data and "name" in data:
                return {"name": str(data["name"]), "hash": str(data["hash"])}
    return None


def has_tokenizer_files(directory: str | Path) -> bool:
    return (Path(directory) / "tokenizer_config.json").is_file()


def find_tokenizer_dir(identity: dict[str, str], candidates: Sequence[str | None]) -> Path | None:
    """The first candidate tokenizer folder (None = the packaged MiniLM) whose files hash to ``identity``."""
    from ctprep.tokenizer import resolve_tokenizer_dir, tokenizer_files_hash

    for cand in candidates:
        try:
            _, folder = resolve_tokenizer_dir(cand)
            if tokenizer_files_hash(folder) == identity.get("hash"):
                return folder
        except (FileNotFoundError, OSError):
            continue
    return None


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer-defining files byte for byte (their hash is the shards' identity)."""
    from ctprep.tokenizer import TOKENIZER_FILES

    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            if (src / name).resolve() != (dst / name).resolve():
                shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


# --------------------------------------------------------------------------- export


def _write_json(path: Path, payload: Any) -> None:
    atomic_write_json(path, payload, indent=1)


def _model_summary(config: dict[str, Any]) -> str:
    v = config.get("vision")
    if not isinstance(v, dict):
        return f"model config keys {sorted(config)}"
    patch = v.get("patch", {}) if isinstance(v.get("patch"), dict) else {}
    return (f"`{config.get('name', 'custom')}`: 3D ViT width {v.get('width')}, depth {v.get('depth')}, "
            f"{v.get('num_heads')} heads, patch {patch.get('patch_size')} (z, y, x), embedding size "
            f"{config.get('embed_dim')}; anatomy encoder {'on' if v.get('anatomy', {}).get('enabled') else 'off'}")


def _eval_lines(result: dict[str, Any] | None) -> list[str]:
    if not result:
        return ["No evaluation found (run `python -m ctprep_train.eval --encoder ... --out RUN/eval`, then export "
                "again to include its figures)."]
    lines = []
    r = result.get("retrieval", {})
    for direction in ("image_to_text", "text_to_image"):
        d = r.get(direction, {})
        if d:
            ks = ", ".join(f"{k} {100 * v:.1f}%" for k, v in d.items() if k.startswith("R@") and v is not None)
            lines.append(f"- {direction.replace('_', ' ')} (pool {d.get('pool_size', r.get('n_images'))}): {ks}")
    base = r.get("random_baseline", {}).get("R@5")
    if base is not None:
        lines.append(f"- random R@5 for the same pool: {100 * base:.1f}%")
    z = result.get("zero_shot", {})
    if z.get("macro_auc") is not None:
        lines.append(f"- zero-shot macro AUC {z['macro_auc']:.3f} over {z.get('labels_evaluated')} labels "
                     f"(prompts {result.get('prompts')})")
    head = f"Split `{result.get('split')}`, {result.get('n_cases')} cases (ctprep_train.eval):"
    return [head, ""] + (lines or ["- (no figures in eval.json)"])


def model_card(directory: Path, training: dict[str, Any], preprocessing: dict[str, Any] | None,
               identity: dict[str, str] | None) -> str:
    config = json.loads((directory / "config.json").read_text()) if (directory / "config.json").is_file() else {}
    data = training.get("data") or {}
    synthetic = any(s.get("synthetic") for s in data.get("sources", []))
    lines = [
        f"# CT vision encoder {_model_summary(config).split(':')[0]}",
        "",
        f"{_model_summary(config)}. Trained CLIP-style against radiology reports, region sentences and "
        f"CoT steps (`trainer/train.py`); exported by `ctprep_train.export` at step {training.get('step', '?')} "
        f"on {training.get('exported', '?')}.",
        "",
        "## Use",
        "",
        "```python",
        "from ctprep_train.inference import load_encoder",
        "model, preprocess, tokenizer = load_encoder(\"THIS_FOLDER\")",
        "batch = preprocess(\"scan.nii.gz\")            # optional: mask=\"seg.nii.gz\", meta={CT-RATE metadata row}",
        "probs = model.classify(batch, {\"effusion\": [\"Pleural effusion is present.\", \"Pleural effusion is not present.\"]})",
        "emb = model.encode_image(batch)               # (1, E), L2-normalised",
        "```",
        "",
        "```",
        "ctprep embed --encoder THIS_FOLDER scans/*.nii.gz --out emb.npy",
        "ctprep classify --encoder THIS_FOLDER scan.nii.gz --prompts prompts.json",
        "```",
        "",
        "## Training data",
        "",
    ]
    if data:
        for split, by_source in data.get("samples", {}).items():
            lines.append(f"- `{split}`: " + ", ".join(f"{s} {n} samples" for s, n in by_source.items()))
        tok = data.get("tokenizer", {})
        lines += ["", f"Shards `{data.get('shards')}`: ctprep {data.get('pipeline_version')}, schema "
                  f"{data.get('schema_version')}, {data.get('generations')} generation(s), tokenizer "
                  f"`{tok.get('name')}` ({str(tok.get('hash', ''))[:12]}).",
                  "Sources: " + (", ".join(f"`{s.get('root')}` ({s.get('source')}"
                                            + (", synthetic" if s.get("synthetic") else "") + ")"
                                            for s in data.get("sources", [])) or "not recorded") + "."]
    else:
        lines.append("Not recorded.")
    lines += ["", "## Preprocessing", ""]
    if preprocessing:
        p = preprocessing
        lines += [
            f"`preprocessing.json` (preset `{p['pipeline_config'].get('name')}`, stage versions "
            f"{p['stage_versions']}): canonical orientation {p['orientation']} (z, y, x), spacing "
            f"{p['spacing_zyx_mm']} mm, {p['grid']}, shape {p['shape_zyx']} ({p['crop_pad']}), HU clip "
            f"{p['hu_clip']}; regions {p['region_names']} (TotalSegmentator ids in `region_map`), patch "
            f"{p['patch_size_zyx']} -> grid {p['patch_grid_zyx']}. `ctprep_train.inference` runs the pipeline's own "
            "read / resample / regions code with it.",
        ]
    else:
        lines.append("**Missing**: this export has no `preprocessing.json`; export again with `--pipeline-config`.")
    lines += ["", "## Evaluation", "", *_eval_lines(training.get("eval")), "",
              "## Intended use", "",
              "Research on chest CT representation learning: embedding volumes for retrieval, zero-shot "
              "finding scores from free-text prompts, patch-level similarity maps for inspection.", "",
              "## Limitations", ""]
    if synthetic:
        lines.append("- Trained on **synthetic** phantom CTs from `ctprep.synth` (the demo data): it has never seen "
                     "a real patient scan and its scores say nothing about real findings.")
    lines += [
        "- Research only. Not a medical device; not validated for any clinical use.",
        "- Inputs are preprocessed to the fixed grid above; a scan covering more than the chest is cropped, one with "
        "no lungs is refused (`not_chest`). Without a segmentation the anatomy branch sees an all-background mask "
        "(as a training case packed with `has_mask: false`).",
        "- Zero-shot probabilities are a softmax over the given prompts at the model's temperature, not calibrated "
        "risks.",
        "",
        "## Files",
        "",
        "`model.safetensors` (weights), `config.json` (model), `preprocessing.json`, the tokenizer files "
        f"(`AutoTokenizer.from_pretrained`), `{TOKENIZER_IDENTITY_FILE}` "
        + (f"({identity.get('name')}, sha256 {identity.get('hash', '')[:12]})" if identity else "")
        + f", `{TRAINING_FILE}`.",
        "",
    ]
    return "\n".join(lines)


def complete_export(directory: str | Path, tokenizer_identity: dict[str, str] | None, *,
                    metadata: dict[str, Any] | None = None, step: int | None = None,
                    eval_result: dict[str, Any] | None = None, run: str | None = None) -> list[str]:
    """Turn a ``save_pretrained`` folder into a self-contained export, in place. Returns warnings.

    Args:
        tokenizer_identity: {"name", "hash"} of the shards' tokenizer (``index.json``).
        metadata: :func:`export_metadata` output (None: no preprocessing / data known).
        step: training step of the weights; eval_result: ``eval.json``; run: the run's folder name.
    """
    directory = Path(directory)
    warn = list((metadata or {}).get("warnings", []))
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    text = config.get("text") if isinstance(config.get("text"), dict) else None
    preprocessing = (metadata or {}).get("preprocessing")
    if tokenizer_identity:
        identity = {"name": str(tokenizer_identity["name"]), "hash": str(tokenizer_identity["hash"])}
        _write_json(directory / TOKENIZER_IDENTITY_FILE, identity)
        candidates: list[str | None] = []
        if has_tokenizer_files(directory):
            candidates.append(str(directory))
        if text is not None:
            candidates.append(None if text.get("path") in (None, ".") else str(text.get("path")))
        if preprocessing:
            candidates.append(preprocessing["pipeline_config"].get("text", {}).get("tokenizer"))
        candidates.append(None)
        found = find_tokenizer_dir(identity, candidates)
        if found is not None:
            copy_tokenizer_files(found, directory)
            if text is not None and text.get("path") is not None:
                text["path"] = "."  # this folder (ctprep_train.model.factory resolves it against the export)
                _write_json(config_path, config)
        else:
            warn.append(f"no local tokenizer folder hashes to {identity['name']} ({identity['hash'][:12]}): "
                        "the export holds its identity only")
            _write_json(directory / LEGACY_IDENTITY_FILE, identity)  # readers of the old layout
    else:
        identity = None
    if preprocessing:
        _write_json(directory / PREPROCESSING_FILE, preprocessing)
    training = {
        "step": step,
        "run": run,
        "exported": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "data": (metadata or {}).get("data"),
        "weights": (metadata or {}).get("weights", "trained"),  # or "ema": the average of train.ema_decay
        "eval": eval_result,
        "warnings": warn,
    }
    _write_json(directory / TRAINING_FILE, training)
    atomic_write_text(directory / CARD_FILE, model_card(directory, training, preprocessing, identity))
    make_readable(directory)
    return warn


def make_readable(directory: Path) -> None:
    """0644 files, 0755 folders: an export is shared (safetensors writes its file 0600)."""
    os.chmod(directory, DIR_MODE)
    for path in directory.iterdir():
        os.chmod(path, DIR_MODE if path.is_dir() else FILE_MODE)


# --------------------------------------------------------------------------- command


def resolve_checkpoint(path: str | Path, step: int | None = None) -> Path:
    """A complete checkpoint folder from a checkpoint folder or a run folder (newest, or ``step``)."""
    from ctprep_train.checkpoint import COMPLETE_MARKER, complete_checkpoints

    path = Path(path)
    if (path / COMPLETE_MARKER).is_file() and step is None:
        return path
    done = complete_checkpoints(path)
    if step is not None:
        done = [(s, p) for s, p in done if s == step]
    if not done:
        what = f"step {step}" if step is not None else "complete checkpoint"
        raise FileNotFoundError(f"{path}: no {what} (a checkpoint folder with {COMPLETE_MARKER}, or a run folder "
                                "with checkpoints/step_*/COMPLETE)")
    return done[-1][1]


def _run_shards(run: Path | None) -> Path | None:
    """The shards folder the run's config.json names (as given, or relative to the run's parent)."""
    if run is None or not (run / "config.json").is_file():
        return None
    shards = json.loads((run / "config.json").read_text()).get("data", {}).get("shards")
    if not shards:
        return None
    from ctprep.schema import INDEX_FILE

    for cand in (Path(shards), run.parent / shards, run.parent.parent / shards):
        if (cand / INDEX_FILE).is_file():
            return cand
    return None


def export(checkpoint: str | Path, out: str | Path, *, shards: str | Path | None = None,
           pipeline_config: str | Path | None = None, eval_json: str | Path | None = None,
           step: int | None = None, overwrite: bool = False) -> Path:
    """Write a self-contained export of a complete checkpoint to ``out`` (atomically). Returns ``out``."""
    from ctprep_train.checkpoint import CHECKPOINT_DIR, COMPLETE_MARKER

    ckpt = resolve_checkpoint(checkpoint, step)
    src = ckpt / "encoder"
    if not (src / "model.safetensors").is_file():
        raise FileNotFoundError(f"{src}: no encoder export in the checkpoint (model.safetensors)")
    run = ckpt.parent.parent if ckpt.parent.name == CHECKPOINT_DIR else None
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass --overwrite)")
    marker = json.loads((ckpt / COMPLETE_MARKER).read_text() or "{}")
    identity = read_tokenizer_identity(src)
    if shards is None and pipeline_config is None and (src / PREPROCESSING_FILE).is_file():
        # What the run recorded when it saved the checkpoint: the shards may have been rebuilt since.
        old = json.loads((src / TRAINING_FILE).read_text()) if (src / TRAINING_FILE).is_file() else {}
        metadata = {"preprocessing": json.loads((src / PREPROCESSING_FILE).read_text()), "data": old.get("data"),
                    "warnings": []}
    elif (shards := Path(shards) if shards else _run_shards(run)) is not None:
        metadata = export_metadata(shards, pipeline_config=pipeline_config)
    elif pipeline_config is not None:
        from ctprep.config import load_config

        spec = preprocessing_spec(load_config(pipeline_config).to_json(), None,
                                  recorded_from=f"pipeline config {pipeline_config}")
        metadata = {"preprocessing": spec, "data": None, "warnings": ["shards not found: no training data summary"]}
    else:
        raise FileNotFoundError(f"{ckpt}: its encoder has no {PREPROCESSING_FILE} and the run's shards (config.json "
                                "data.shards) are not found; pass --shards DIR or --pipeline-config PRESET_OR_YAML")
    recorded = json.loads((src / TRAINING_FILE).read_text()) if (src / TRAINING_FILE).is_file() else {}
    metadata = {**metadata, "weights": recorded.get("weights", "trained")}  # the weight average stays labelled
    eval_path = Path(eval_json) if eval_json else (run / "eval" / "eval.json" if run else None)
    eval_result = json.loads(eval_path.read_text()) if eval_path is not None and eval_path.is_file() else None
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for name in ("model.safetensors", "config.json"):
            shutil.copyfile(src / name, tmp / name)
        if has_tokenizer_files(src):  # a checkpoint of this version: its verified tokenizer files
            copy_tokenizer_files(src, tmp)
        for w in complete_export(tmp, identity, metadata=metadata, step=int(marker.get("step", -1)),
                                 eval_result=eval_result, run=run.name if run else None):
            warnings.warn(w, stacklevel=2)
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="run folder (newest complete checkpoint) or checkpoints/step_XXXXXXXX")
    p.add_argument("--out", required=True, help="export folder to write")
    p.add_argument("--step", type=int, default=None, help="with a run folder: this step instead of the newest")
    p.add_argument("--shards", default=None, help="shards folder the run trained on (default: the run's data.shards)")
    p.add_argument("--pipeline-config", default=None,
                   help="pipeline preset or YAML the shards were built with (default: SHARDS/work/manifest.sqlite)")
    p.add_argument("--eval", dest="eval_json", default=None, help="eval.json to quote (default: RUN/eval/eval.json)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Path:
    a = parse_args(argv)
    try:
        out = export(a.checkpoint, a.out, shards=a.shards, pipeline_config=a.pipeline_config,
                     eval_json=a.eval_json, step=a.step, overwrite=a.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
