"""Using a trained encoder: the self-contained export, ctprep_train.inference, `ctprep embed / classify`.

Synthetic CT-RATE (demo grid) is built into real shards by ctprep.runner.build; the encoder is an
untrained tiny CTCLIP written the way a checkpoint holds it and exported by `ctprep_train.export` (one
test trains one real step instead). Its text tower points at a private copy of the MiniLM folder
that is deleted, with the run, before anything loads the export: loading needs neither.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from ctprep.config import load_config
from ctprep.stages.base import get_stage
from ctprep.quarantine import MISSING_METADATA, QuarantineError
from ctprep.schema import ABNORMALITY_LABELS
from ctprep_train.eval import metrics
from ctprep_train.checkpoint import COMPLETE_MARKER, complete_checkpoints, resolve_resume
from ctprep_train.data import collate_samples
from ctprep_train.eval.data import iter_split
from ctprep_train.export import PREPROCESSING_FILE, TOKENIZER_IDENTITY_FILE, complete_export, export_metadata
from ctprep_train.export import main as export_main
from ctprep_train.inference import load_encoder

CASES = 10  # 8 train + 2 valid volumes; train_4_a_1 and valid_1_a_2 are v1 files (blank header)
EFFUSION = {"effusion": ["Pleural effusion is present.", "Pleural effusion is not present."]}


@pytest.fixture(scope="module")
def dataset(synthetic_ctrate) -> Path:
    return synthetic_ctrate(cases=CASES, seed=0)


@pytest.fixture(scope="module")
def shards(built_shards) -> Path:
    return built_shards(cases=CASES, seed=0)


def _text_model_copy(dst: Path) -> Path:
    """A private copy of the MiniLM folder: plays a text model that exists only on the training machine."""
    from ctprep_train.model.text_encoder import default_text_model_dir

    src = default_text_model_dir()
    dst.mkdir(parents=True)
    for path in src.iterdir():
        if path.is_file():
            shutil.copyfile(path, dst / path.name)
    return dst


@pytest.fixture(scope="module")
def encoder_dir(shards, tmp_path_factory) -> Path:
    """An exported untrained tiny CTCLIP, moved away from its run (run and text model deleted)."""
    from ctprep_train.model import create_model, save_pretrained

    base = tmp_path_factory.mktemp("inference_run")
    text_dir = _text_model_copy(base / "machine" / "biomed-text")
    torch.manual_seed(0)
    model = create_model("tiny", **{"text.path": str(text_dir)})
    run = base / "run"
    ckpt = run / "checkpoints" / "step_00000003"
    index = json.loads((shards / "index.json").read_text())
    save_pretrained(model, ckpt / "encoder")  # what checkpoint.export_encoder does after the ZeRO merge
    complete_export(ckpt / "encoder", index["tokenizer"], metadata=export_metadata(shards, index), step=3)
    (ckpt / COMPLETE_MARKER).write_text(json.dumps({"step": 3}))
    (run / "config.json").write_text(json.dumps({"data": {"shards": str(shards)}}))
    (run / "eval").mkdir()
    (run / "eval" / "eval.json").write_text(json.dumps({
        "split": "valid", "n_cases": 2, "prompts": ["{label} is present.", "{label} is not present."],
        "retrieval": {"n_images": 2, "image_to_text": {"pool_size": 2, "R@1": 0.5, "R@5": 1.0},
                      "text_to_image": {"pool_size": 2, "R@1": 0.5, "R@5": 1.0}, "random_baseline": {"R@5": 1.0}},
        "zero_shot": {"macro_auc": 0.625, "labels_evaluated": 3}}))
    export_main([str(run), "--out", str(base / "export")])
    moved = tmp_path_factory.mktemp("elsewhere") / "encoder"
    shutil.copytree(base / "export", moved)
    shutil.rmtree(base)  # the run, its export and the "training machine's" text model are gone
    return moved


@pytest.fixture(scope="module")
def loaded(encoder_dir):
    return load_encoder(encoder_dir)


def _raw_files(root: Path, case_id: str) -> tuple[Path, Path]:
    image = [p for p in root.rglob(f"{case_id}.nii.gz") if "masks" not in p.parts]
    mask = [p for p in root.rglob(f"{case_id}.nii.gz") if "masks" in p.parts]
    assert len(image) == 1 and len(mask) == 1, (image, mask)
    return image[0], mask[0]


def _metadata(root: Path) -> dict[str, dict[str, str]]:
    rows = {}
    for path in (root / "metadata").glob("*.csv"):
        with open(path, newline="") as fh:
            rows.update({r["VolumeName"]: r for r in csv.DictReader(fh)})
    return rows


def _labels(root: Path) -> dict[str, list[int]]:
    out = {}
    for path in (root / "multi_abnormality_labels").glob("*.csv"):
        with open(path, newline="") as fh:
            for r in csv.DictReader(fh):
                out[r["VolumeName"].removesuffix(".nii.gz")] = [int(r[name]) for name in ABNORMALITY_LABELS]
    return out


def _shard_samples(shards: Path, split: str = "train") -> dict[str, dict]:
    return {s["__key__"]: s for s in iter_split(shards, split)}


# --------------------------------------------------------------------------- preprocessing = shards


def test_preprocess_of_a_raw_file_equals_its_shard_sample(dataset, shards, loaded):
    _, preprocess, _ = loaded
    meta = _metadata(dataset)
    samples = _shard_samples(shards)
    styles = set()
    for cid in ("train_1_a_1", "train_4_a_1", "train_3_a_2"):  # train_4_a_1 is a v1 file
        image, mask = _raw_files(dataset, cid)
        batch = preprocess(image, mask=mask, meta=meta[f"{cid}.nii.gz"])
        shard = collate_samples([samples[cid]])
        styles.add(batch["meta"][0]["header_style"])
        assert batch["image"].dtype == torch.int16 and batch["image"].shape == shard["image"].shape == (1, 32, 128, 128)
        assert int((batch["image"].int() - shard["image"].int()).abs().max()) <= 1
        assert torch.equal(batch["mask"], shard["mask"])
        assert batch["regions"].dtype == shard["regions"].dtype == torch.float16
        assert torch.equal(batch["regions"], shard["regions"])
        assert batch["ids"] == [cid] and batch["meta"][0]["has_mask"] is True
        assert batch["meta"][0]["spacing"] == samples[cid]["meta"]["spacing"]
    assert styles == {"v1", "v2"}
    v1_image, _ = _raw_files(dataset, "train_4_a_1")
    with pytest.raises(QuarantineError) as err:  # a v1 file without its metadata row, as the pipeline says
        preprocess(v1_image)
    assert err.value.kind == MISSING_METADATA


def test_preprocess_of_an_array_matches_the_file_path(dataset, loaded):
    import nibabel as nib

    _, preprocess, _ = loaded
    image, mask = _raw_files(dataset, "train_2_a_1")
    img = nib.load(str(image))
    from_file = preprocess(image, mask=mask)
    from_array = preprocess(np.asanyarray(img.dataobj).astype(np.int16), mask=np.asanyarray(nib.load(str(mask)).dataobj),
                            meta={"affine": img.affine.tolist()})
    assert torch.equal(from_file["image"], from_array["image"]) and torch.equal(from_file["mask"], from_array["mask"])
    with pytest.raises(ValueError, match="geometry"):
        preprocess(np.zeros((8, 8, 8), np.int16))


def test_encode_image_equals_the_training_path_embedding(dataset, shards, loaded):
    model, preprocess, _ = loaded
    meta = _metadata(dataset)
    samples = _shard_samples(shards)
    ids = ["train_2_a_2", "train_4_a_1"]
    raw = [preprocess(_raw_files(dataset, c)[0], mask=_raw_files(dataset, c)[1], meta=meta[f"{c}.nii.gz"]) for c in ids]
    from ctprep_train.inference import collate

    mine = model.encode_image(collate(raw))
    shard_batch = collate_samples([samples[c] for c in ids])  # what the trainer and evaluator feed
    with torch.no_grad():
        theirs = model.clip.encode_image(shard_batch).float()
        trained = model.clip(shard_batch)["image_embed"].float()
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine, trained, rtol=1e-5, atol=1e-5)
    assert mine.shape == (2, model.clip.cfg.embed_dim)
    torch.testing.assert_close(mine.norm(dim=-1), torch.ones(2))


# --------------------------------------------------------------------------- the export


def test_export_is_self_contained_portable_and_readable(encoder_dir, loaded, dataset):
    from transformers import AutoTokenizer

    names = {p.name for p in encoder_dir.iterdir()}
    assert {"model.safetensors", "config.json", PREPROCESSING_FILE, "tokenizer_config.json", "vocab.txt",
            TOKENIZER_IDENTITY_FILE, "training.json", "README.md"} <= names
    for path in encoder_dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    config = json.loads((encoder_dir / "config.json").read_text())
    assert config["text"]["path"] == "." and config["text"]["hf_config"]
    spec = json.loads((encoder_dir / PREPROCESSING_FILE).read_text())
    demo = load_config("demo")
    assert spec["spacing_zyx_mm"] == list(demo.resample.spacing_zyx) and spec["shape_zyx"] == list(demo.resample.shape_zyx)
    assert spec["orientation"] == "SAR" and spec["patch_grid_zyx"] == [8, 8, 8]
    assert spec["region_names"] == demo.regions.names and spec["region_map"] == demo.regions.regions
    assert spec["hu_clip"] == list(demo.resample.hu_clip) and spec["stage_versions"] == {"resample": get_stage("resample").version,
                                                                         "regions": get_stage("regions").version}
    card = (encoder_dir / "README.md").read_text()
    assert "step 3" in card and "ctrate 8 samples" in card and "synthetic" in card and "0.625" in card
    assert "Research only" in card
    # the tokenizer: Hugging Face loads the folder, and its files hash to what the shards carry
    hf = AutoTokenizer.from_pretrained(str(encoder_dir), local_files_only=True)
    model, _, tokenizer = loaded
    ids, attn = tokenizer("Pleural effusion is present.")
    assert hf("Pleural effusion is present.")["input_ids"] == ids[0][attn[0]].tolist()
    identity = json.loads((encoder_dir / TOKENIZER_IDENTITY_FILE).read_text())
    assert tokenizer.identity["hash"] == identity["hash"]
    # it embeds (the run, its shards' path and the text model's folder are not needed)
    image, _ = _raw_files(dataset, "train_1_a_1")
    emb = model.encode_image(loaded[1](image))
    assert emb.shape == (1, 128) and torch.isfinite(emb).all()


def test_export_of_a_checkpoint_written_before_exports_were_self_contained(shards, tmp_path):
    from ctprep_train.model import create_model, save_pretrained

    ckpt = tmp_path / "run" / "checkpoints" / "step_00000005"
    save_pretrained(create_model("tiny", **{"text.pretrained": False}), ckpt / "encoder")
    identity = json.loads((shards / "index.json").read_text())["tokenizer"]
    (ckpt / "encoder" / "tokenizer.json").write_text(json.dumps(identity))  # the old layout: identity only
    (ckpt / COMPLETE_MARKER).write_text(json.dumps({"step": 5}))
    export_main([str(ckpt), "--out", str(tmp_path / "export"), "--shards", str(shards)])
    out = tmp_path / "export"
    assert json.loads((out / TOKENIZER_IDENTITY_FILE).read_text()) == identity
    assert "model" in json.loads((out / "tokenizer.json").read_text())  # Hugging Face's file now
    assert json.loads((out / PREPROCESSING_FILE).read_text())["shape_zyx"] == [32, 128, 128]
    assert json.loads((out / "training.json").read_text())["step"] == 5
    model, preprocess, tokenizer = load_encoder(out)
    assert tokenizer.identity["hash"] == identity["hash"]


def test_export_command_needs_a_complete_checkpoint(tmp_path):
    (tmp_path / "run" / "checkpoints" / "step_00000002").mkdir(parents=True)  # no COMPLETE marker
    with pytest.raises(SystemExit):
        export_main([str(tmp_path / "run"), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- no mask, classify, maps


def test_without_a_mask_it_embeds_as_a_case_packed_without_one(dataset, loaded):
    model, preprocess, _ = loaded
    image, mask = _raw_files(dataset, "train_3_a_1")
    with_mask = preprocess(image, mask=mask)
    without = preprocess(image)
    assert without["meta"][0]["has_mask"] is False and with_mask["meta"][0]["has_mask"] is True
    assert torch.equal(without["image"], with_mask["image"])
    assert int(without["mask"].max()) == 0 and int(with_mask["mask"].max()) > 0  # the mask is used
    assert torch.all(without["regions"][..., 0] == 1) and torch.all(without["regions"][..., 1:] == 0)
    e0, e1 = model.encode_image(without), model.encode_image(with_mask)
    assert torch.isfinite(e0).all() and torch.isfinite(e1).all()
    assert float((e0 - e1).abs().max()) > 1e-3
    # the fallback is what the model computes from an all-background mask by itself
    blank = {"image": with_mask["image"], "mask": torch.zeros_like(with_mask["mask"])}
    with torch.no_grad():
        torch.testing.assert_close(e0, model.clip.encode_image({**blank, "regions": without["regions"]}).float())


def test_classify_gives_a_probability_per_finding_and_draws_a_similarity_map(dataset, loaded, tmp_path):
    model, preprocess, _ = loaded
    image, mask = _raw_files(dataset, "train_1_a_1")
    batch = preprocess(image, mask=mask)
    prompts = {**EFFUSION, "nodule": ["lung nodule", "no lung nodule", "normal lungs"]}
    scores = model.classify(batch, prompts)
    assert list(scores) == ["effusion", "nodule"]
    assert all(0.0 <= p <= 1.0 for p in scores.values())
    with pytest.raises(ValueError, match=">= 2 sentences"):
        model.classify(batch, {"x": ["only one"]})
    sims = model.similarity(model.encode_image(batch), model.encode_text(["a", "b", "c"]))
    assert sims.shape == (1, 3) and float(sims.abs().max()) <= 1.0 + 1e-6
    maps = model.similarity_map(batch, "pleural effusion")
    assert maps["grid"].shape == (8, 8, 8) and maps["volume"].shape == (32, 128, 128)
    assert np.isfinite(maps["volume"]).all()
    png = model.save_similarity_map(batch, "pleural effusion", tmp_path / "map.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_zero_shot_auc_through_the_api_equals_trainer_evaluate(dataset, shards, encoder_dir, loaded):
    from ctprep_train.eval import run as evaluate

    # ctprep_train.eval's own zero-shot code on the shards (same encoder folder, same prompts)
    cfg = evaluate.EvalConfig(encoder=encoder_dir, shards=shards, split="train", batch_size=4, picture_cases=0)
    model_e = evaluate.load_encoder(encoder_dir, torch.device("cpu"))
    from ctprep.tokenizer import load_tokenizer

    col = evaluate.collect(model_e, cfg)
    max_len = max(16, max(len(p) for p in cfg.prompts) + 32)
    pos, neg = evaluate.encode_prompts(model_e, load_tokenizer(model_e.cfg.text.path), cfg.prompts, max_len, "cpu")
    reference = metrics.zero_shot_metrics(torch.cat(col.image_emb), pos, neg, np.concatenate(col.labels),
                                          ABNORMALITY_LABELS)
    # the single-volume API on the raw files of the same cases
    model, preprocess, _ = loaded
    meta, truth = _metadata(dataset), _labels(dataset)
    prompts = {name: [t.format(label=name) for t in evaluate.DEFAULT_PROMPTS] for name in ABNORMALITY_LABELS}
    probs = []
    for cid in col.ids:
        image, mask = _raw_files(dataset, cid)
        scores = model.classify(preprocess(image, mask=mask, meta=meta[f"{cid}.nii.gz"]), prompts)
        probs.append([scores[name] for name in ABNORMALITY_LABELS])
    probs, y = np.asarray(probs), np.asarray([truth[c] for c in col.ids])
    evaluated = 0
    for c, name in enumerate(ABNORMALITY_LABELS):
        known = y[:, c] >= 0
        auc = metrics.auc_mann_whitney(probs[known, c], y[known, c] == 1)
        ref = reference["per_label"][name]["auc"]
        assert (math.isnan(auc) and math.isnan(ref)) or auc == pytest.approx(ref, abs=1e-12), name
        evaluated += not math.isnan(auc)
    assert evaluated >= 3 and len(col.ids) == 8


# --------------------------------------------------------------------------- CLI


def test_embed_and_classify_commands_with_a_broken_file(dataset, encoder_dir, loaded, tmp_path):
    from typer.testing import CliRunner

    from ctprep.cli import app

    good, _ = _raw_files(dataset, "train_2_a_1")
    broken = tmp_path / "broken_1_a_1.nii.gz"
    broken.write_bytes(good.read_bytes()[:4000])  # a truncated gzip
    out = tmp_path / "emb" / "emb.npy"
    runner = CliRunner()
    result = runner.invoke(app, ["embed", "--encoder", str(encoder_dir), str(broken), str(good), "--out", str(out),
                                 "--metadata", str(dataset / "metadata" / "train_metadata.csv"), "--no-progress"])
    assert result.exit_code == 0, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(broken) in errors[0] and "unreadable" in errors[0]
    emb = np.load(out, allow_pickle=False)
    record = json.loads(out.with_suffix(".json").read_text())
    assert emb.shape == (1, 128) and record["ids"] == ["train_2_a_1"] and len(record["failed"]) == 1
    model, preprocess, _ = loaded
    np.testing.assert_allclose(emb[0], model.encode_image(preprocess(good))[0].numpy(), rtol=1e-5, atol=1e-5)

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(EFFUSION))
    result = runner.invoke(app, ["classify", "--encoder", str(encoder_dir), str(good), "--prompts", str(prompts),
                                 "--json"])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)["scores"]
    assert scores["effusion"] == pytest.approx(model.classify(preprocess(good), EFFUSION)["effusion"], abs=1e-6)
    result = runner.invoke(app, ["classify", "--encoder", str(encoder_dir), str(broken), "--prompts", str(prompts)])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and "unreadable" in result.stderr


# --------------------------------------------------------------------------- --resume latest, real training


def test_resume_latest_is_auto(tmp_path):
    from ctprep_train.train import parse_args

    for step, complete in ((1, True), (2, True), (3, False)):
        folder = tmp_path / "checkpoints" / f"step_{step:08d}"
        folder.mkdir(parents=True)
        if complete:
            (folder / COMPLETE_MARKER).write_text("{}")
    newest = complete_checkpoints(tmp_path)[-1][1]
    assert resolve_resume(tmp_path, "latest") == resolve_resume(tmp_path, "auto") == newest
    assert resolve_resume(tmp_path / "empty", "latest") is None
    assert parse_args(["--config", "c.yaml", "--resume", "latest"]).resume == "latest"


def test_a_trained_run_exports_itself(dataset, shards, tmp_path):
    """One real step of the tiny CTCLIP on the pipeline's shards: RUN/encoder loads with load_encoder."""
    from tests.trainer_helpers import launch

    run = tmp_path / "run"
    launch(["--config", "configs/train/demo.yaml", "--shards", str(shards), "--output", str(run),
            "data.num_workers=0", "train.steps=1", "train.val_every=0", "train.ckpt_every=0",
            "train.progress_bar=false",  # a one-block model with a frozen text tower: the wiring, fast
            'model.overrides={"vision.depth": 1, "vision.out_indices": [0], "text.freeze_layers": -1}'],
           timeout=600)
    encoder = run / "encoder"
    assert (encoder / PREPROCESSING_FILE).is_file() and (encoder / "tokenizer_config.json").is_file()
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in encoder.iterdir())
    assert "step 1" in (encoder / "README.md").read_text()
    model, preprocess, _ = load_encoder(encoder)
    assert torch.isfinite(model.encode_image(preprocess(_raw_files(dataset, "train_1_a_1")[0]))).all()
    export_main([str(run), "--out", str(tmp_path / "export")])  # from the run folder: its newest checkpoint
    assert (tmp_path / "export" / PREPROCESSING_FILE).read_text() == (encoder / PREPROCESSING_FILE).read_text()
