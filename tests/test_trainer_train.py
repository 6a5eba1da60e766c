"""trainer/train.py end to end on CPU: one process and 2 gloo ranks, ZeRO 2/3, resume.

Each test launches the real script in a subprocess (plain python or torchrun) with a timeout,
on tiny shards written by ctprep_train.testing. Most use the TinyCLIP stand-in (tests/trainer_helpers)
to stay within seconds; one runs the real tiny CTCLIP + MultiTaskLoss.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.trainer_helpers import STAND_IN, launch, load_weights, read_metrics
from ctprep_train.checkpoint import COMPLETE_MARKER, complete_checkpoints
from ctprep_train.testing import write_test_shards

CONFIG = "configs/train/demo.yaml"


def _args(shards, out, *extra):
    return ["--config", CONFIG, "--shards", str(shards), "--output", str(out), *STAND_IN,
            "train.val_every=0", "train.log_every=1", *extra]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_test_shards(root, {"train": [6, 5, 1], "valid": [5]})
    return root


def _loss_went_down(rows, factor=0.8):
    losses = [r["loss"] for r in rows]
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < factor * first, losses


def test_single_process_overfits_a_fixed_batch_and_writes_everything(shards, tmp_path):
    out = tmp_path / "run"
    launch(_args(shards, out, "train.steps=12", "train.overfit_batches=1", "optim.lr=0.001",
                 "optim.warmup_steps=0", "optim.weight_decay=0", "train.ckpt_every=6", "data.batch_size=4"))
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 13))
    for key in ("loss", "loss_clip", "lr", "temperature", "samples_per_s", "data_wait_frac"):
        assert key in rows[0]
    _loss_went_down(rows)
    valid = read_metrics(out, "valid")
    assert valid and "image_to_text/R@1" in valid[-1] and valid[-1]["pool_size"] == 5
    assert [s for s, _ in complete_checkpoints(out)] == [6, 12]
    assert (out / "tensorboard").is_dir() and any((out / "tensorboard").iterdir())
    export = load_weights(out / "encoder")
    assert set(export) >= {"patch.weight", "logit_scale"} and export["logit_scale"].shape == ()
    assert (out / "encoder" / "tokenizer.json").is_file()


def test_two_gloo_ranks_zero2_overfit(shards, tmp_path):
    out = tmp_path / "run"
    launch(_args(shards, out, "train.steps=10", "train.overfit_batches=1", "optim.lr=0.001",
                 "optim.warmup_steps=0", "optim.weight_decay=0", "data.batch_size=3"),
           nproc=2, launcher="torchrun")
    rows = read_metrics(out)
    assert len(rows) == 10
    assert rows[0]["samples_per_s"] > 0
    _loss_went_down(rows)


def test_two_gloo_ranks_zero3_uneven_shards_stream_without_hang(shards, tmp_path):
    # train shards hold 6, 5 and 1 samples: one rank's share is much smaller; 2 workers per rank
    out = tmp_path / "run"
    launch(_args(shards, out, "train.steps=6", "train.deepspeed=configs/deepspeed/zero3.json",
                 "data.num_workers=2", "train.val_every=3", "train.ckpt_every=3",
                 "train.deepspeed_overrides={gradient_accumulation_steps: 2}"),
           nproc=2, launcher="torchrun", timeout=300)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert rows[-1]["epoch"] == pytest.approx(6 * 2 / (12 // (2 * 2)))
    valid = read_metrics(out, "valid")
    assert [v["step"] for v in valid] == [3, 6] and valid[0]["pool_size"] == 5
    assert [s for s, _ in complete_checkpoints(out)] == [3, 6]
    assert load_weights(out / "encoder")["patch.weight"].dtype == torch.float32


# Augmentation on: a resumed run must also replay the same shifts and jitter.
AUGMENT = ("augment.enabled=true", "augment.shift_voxels=[1,4,4]", "augment.hu_scale=0.05", "augment.noise_hu=10")


def test_resume_auto_continues_at_the_right_step_with_the_checkpoint_weights(shards, tmp_path):
    reference = tmp_path / "reference"
    launch(_args(shards, reference, "train.steps=4", "train.ckpt_every=2", "train.keep_checkpoints=5", *AUGMENT))
    # "killed" run: its last complete checkpoint is step 2, and it died while writing step 3
    killed = tmp_path / "killed"
    (killed / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference / "checkpoints" / "step_00000002", killed / "checkpoints" / "step_00000002")
    half = killed / "checkpoints" / "step_00000003"
    half.mkdir()
    (half / "mp_rank_00_model_states.pt").write_bytes(b"half-written")
    assert not (half / COMPLETE_MARKER).exists()

    launch(_args(shards, killed, "train.steps=4", "train.ckpt_every=2", *AUGMENT, "--resume", "auto"))
    resumed = read_metrics(killed, "resume")
    assert resumed[0]["step"] == 2 and resumed[0]["checkpoint"].endswith("step_00000002")
    rows = read_metrics(killed)
    assert [r["step"] for r in rows] == [3, 4]
    ref_rows = {r["step"]: r for r in read_metrics(reference)}
    # same weights + same data position => the same step-3 loss as the uninterrupted run
    assert rows[0]["loss"] == pytest.approx(ref_rows[3]["loss"], rel=1e-5)
    a, b = load_weights(reference / "encoder"), load_weights(killed / "encoder")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)
    assert not half.exists()  # the stale half-written checkpoint was cleaned up


def test_real_tiny_ctclip_trains_two_steps(shards, tmp_path):
    import ctprep_train.losses  # noqa: F401 (a [dev] dependency)
    out = tmp_path / "run"
    launch(["--config", CONFIG, "--shards", str(shards), "--output", str(out), "data.tokenizer=index",
            "data.num_workers=0", "train.steps=2", "train.val_every=2", "train.ckpt_every=0",
            "train.progress_bar=false"], timeout=400)
    rows = read_metrics(out)
    assert len(rows) == 2 and all(r["loss"] == r["loss"] for r in rows)  # finite, not NaN
    assert {"loss_clip", "loss_region"} <= set(rows[0])
    from ctprep_train.model import load_pretrained

    model = load_pretrained(out / "encoder")
    assert model.logit_scale.shape == ()


def test_a_batchnorm_head_with_one_sample_per_rank_is_refused_before_training():
    from ctprep_train.config import ConfigError, load_config
    from ctprep_train.train import build_model

    cfg = load_config(None, ["data.batch_size=1", 'model.overrides={"vision.head_norm": "batch"}'])
    with pytest.raises(ConfigError, match="head_norm"):
        build_model(cfg)
    cfg = load_config(None, ["data.batch_size=2", 'model.overrides={"vision.head_norm": "batch"}'])
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in build_model(cfg).modules())
    assert build_model(load_config(None, ["data.batch_size=1"])) is not None  # tiny's default head: no BatchNorm


def test_sync_batchnorm_converts_on_gpu_ranks_refuses_cpu_ranks_and_keeps_the_weights():
    from ctprep_train.config import ConfigError, load_config
    from ctprep_train.train import DistInfo, apply_sync_batchnorm, build_model

    bn = 'model.overrides={"vision.head_norm": "batch", "vision.patch.stem_norm": "batch"}'
    cfg = load_config(None, ["data.batch_size=2", "train.sync_batchnorm=true", bn])
    model = build_model(cfg)
    n_bn = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert n_bn >= 2  # the head's BatchNorm1d and the stem's BatchNorm3d
    before = {k: v.clone() for k, v in model.state_dict().items()}

    assert apply_sync_batchnorm(model, cfg, DistInfo(0, 1, 0, torch.device("cpu"))) is model  # one rank
    with pytest.raises(ConfigError, match="sync_batchnorm.*GPU"):
        apply_sync_batchnorm(model, cfg, DistInfo(0, 2, 0, torch.device("cpu")))
    off = load_config(None, ["data.batch_size=2", bn])
    assert apply_sync_batchnorm(model, off, DistInfo(0, 2, 0, torch.device("cpu"))) is model
    plain = build_model(load_config(None, ["train.sync_batchnorm=true"]))  # no BatchNorm: nothing to do
    assert apply_sync_batchnorm(plain, cfg, DistInfo(0, 2, 0, torch.device("cpu"))) is plain

    # GPU ranks: the swap itself needs no GPU (the sync happens in a training forward)
    synced = apply_sync_batchnorm(model, cfg, DistInfo(0, 2, 0, torch.device("cuda", 0)))
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules()) == n_bn
    assert not any(type(m) in (torch.nn.BatchNorm1d, torch.nn.BatchNorm3d) for m in synced.modules())
    after = synced.state_dict()
    assert after.keys() == before.keys()  # checkpoints and the encoder export load either way
    assert all(torch.equal(after[k], before[k]) for k in before)


# --------------------------------------------------------------------------- bf16 on CPU ranks

AUTOCAST = {"torch_autocast": {"enabled": True, "dtype": "bfloat16"}, "zero_optimization": {"stage": 2}}


@pytest.mark.parametrize("policy,native,device,kept", [
    ("auto", True, "cpu", True),     # oneDNN runs bf16 here: keep it
    ("auto", False, "cpu", False),   # no AVX-512 / AMX: bf16 convolutions would crawl, use fp32
    ("bf16", False, "cpu", True),    # asked for
    ("fp32", True, "cpu", False),    # asked for: fp32 on every CPU
    ("fp32", False, "cuda", True),    # GPU ranks always follow the JSON
])
def test_cpu_precision_policy_turns_autocast_off_only_where_asked(policy, native, device, kept):
    from ctprep_train.train import cpu_precision

    ds, note = cpu_precision(AUTOCAST, policy, torch.device(device), native)
    assert ds["torch_autocast"]["enabled"] is kept
    assert ds["torch_autocast"]["dtype"] == "bfloat16" and ds["zero_optimization"] == {"stage": 2}
    assert (note is None) is kept
    if not kept:
        assert ds["bf16"]["enabled"] is False and "fp32" in note
        assert ("no native bf16" in note) is (policy == "auto")
    assert AUTOCAST["torch_autocast"]["enabled"] is True  # the caller's dict is not changed


def test_cpu_precision_policy_leaves_an_fp32_json_alone():
    from ctprep_train.train import cpu_precision

    ds = {"zero_optimization": {"stage": 2}}
    assert cpu_precision(ds, "fp32", torch.device("cpu"), False) == (ds, None)


def test_cpu_precision_fp32_trains_in_fp32_and_says_so(shards, tmp_path):
    out = tmp_path / "run"
    proc = launch(_args(shards, out, "train.steps=2", "train.ckpt_every=2", "train.cpu_precision=fp32"))
    assert "training in fp32 on CPU: train.cpu_precision=fp32" in proc.stderr
    assert len(read_metrics(out)) == 2


def test_an_unknown_cpu_precision_value_is_refused():
    from ctprep_train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.cpu_precision"):
        load_config(CONFIG, ["train.cpu_precision=fp16"])
