"""The weight average of ``train.ema_decay``: its arithmetic, its swap for validation, its file, and
the trainer's use of it (exports hold it, ``--resume`` continues it, ZeRO-3 is refused)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
from torch import nn

from tests.trainer_helpers import PYTHON, REPO, STAND_IN, launch, load_weights
from ctprep_train.checkpoint import complete_checkpoints
from ctprep_train.ema import EMA_FILE, WeightEma
from ctprep_train.testing import write_test_shards


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def _set_weights(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
        model[1].running_mean.fill_(value)
        model[1].num_batches_tracked.fill_(int(value))


def test_the_average_follows_the_formula_with_warmup_and_copies_integer_buffers():
    model = _model()
    _set_weights(model, 0.0)
    ema = WeightEma(model, decay=0.8)
    expected = 0.0
    for n, value in enumerate([1.0, 2.0, 4.0, 8.0, 16.0, 32.0], start=1):
        _set_weights(model, value)
        ema.update(model)
        d = min(0.8, (1 + n) / (10 + n))  # warm-up, then the configured decay
        expected = d * expected + (1 - d) * value
        assert ema.updates == n
        for key in ("0.weight", "0.bias", "1.weight", "1.running_mean"):
            torch.testing.assert_close(ema.shadow[key], torch.full_like(ema.shadow[key], expected))
        assert int(ema.shadow["1.num_batches_tracked"]) == int(value)  # copied, not averaged
    assert ema.shadow["0.weight"].dtype == torch.float32


def test_the_average_is_kept_in_fp32_for_bf16_weights():
    model = _model().to(torch.bfloat16)
    ema = WeightEma(model, decay=0.9)
    assert all(v.dtype == torch.float32 for k, v in ema.shadow.items() if k != "1.num_batches_tracked")
    before = ema.shadow["0.weight"].clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model)
    d = min(0.9, 2 / 11)
    torch.testing.assert_close(ema.shadow["0.weight"], d * before + (1 - d) * model[0].weight.float())


def test_applied_swaps_the_average_in_and_the_live_weights_back_even_on_error():
    model = _model()
    ema = WeightEma(model, decay=0.5)
    live = {k: v.clone() for k, v in model.state_dict().items()}
    for v in ema.shadow.values():
        if v.is_floating_point():
            v.add_(10.0)
    with ema.applied(model):
        torch.testing.assert_close(model[0].weight, live["0.weight"] + 10.0)
    with pytest.raises(RuntimeError, match="boom"):
        with ema.applied(model):
            raise RuntimeError("boom")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, live[k])


def test_save_and_load_round_trip_and_a_mismatched_file_is_refused(tmp_path):
    model = _model()
    ema = WeightEma(model, decay=0.7)
    _set_weights(model, 3.0)
    ema.update(model)
    ema.update(model)
    ema.save(tmp_path)
    other = WeightEma(_model(), decay=0.7)
    assert other.load(tmp_path)
    assert other.updates == 2
    for k in ema.shadow:
        torch.testing.assert_close(other.shadow[k], ema.shadow[k])
    assert not WeightEma(_model(), decay=0.7).load(tmp_path / "nothing-here")
    with pytest.raises(RuntimeError, match="does not match the model"):
        WeightEma(nn.Linear(3, 2), decay=0.7).load(tmp_path)
    with pytest.raises(ValueError, match="ema_decay"):
        WeightEma(model, decay=1.0)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / EMA_FILE).write_bytes((tmp_path / EMA_FILE).read_bytes()[:40])  # a save cut short
    with pytest.raises(RuntimeError, match=r"broken/ema\.safetensors: not a readable weight average"):
        WeightEma(_model(), decay=0.7).load(broken)


# --------------------------------------------------------------------------- the trainer

CONFIG = "configs/train/demo.yaml"
EMA = ("train.ema_decay=0.6",)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_test_shards(root, {"train": [6, 5, 1], "valid": [5]})
    return root


def _args(shards, out, *extra):
    return ["--config", CONFIG, "--shards", str(shards), "--output", str(out), *STAND_IN,
            "train.log_every=1", "optim.lr=0.01", "optim.warmup_steps=0", "data.batch_size=4", *extra]


def _raw_weights(ckpt_dir):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)


def test_the_export_holds_the_average_and_resume_continues_it(shards, tmp_path):
    reference = tmp_path / "reference"
    launch(_args(shards, reference, "train.steps=4", "train.ckpt_every=2", "train.val_every=2",
                 "train.keep_checkpoints=5", *EMA))
    done = dict(complete_checkpoints(reference))
    assert sorted(done) == [2, 4]
    last = done[4]
    from safetensors.torch import load_file

    average = load_file(str(last / EMA_FILE))
    exported = load_weights(reference / "encoder")
    raw = _raw_weights(last)
    assert set(exported) == set(average) == set(raw)
    for name in exported:
        torch.testing.assert_close(exported[name], average[name].reshape(exported[name].shape))
    # four steps at lr 0.01 move the weights away from their average
    assert any(not torch.allclose(exported[n], raw[n].reshape(exported[n].shape)) for n in exported)
    training = json.loads((reference / "encoder" / "training.json").read_text())
    assert training["weights"] == "ema" and training["step"] == 4
    # a re-export of the checkpoint (python -m ctprep_train.export) keeps the average and says so
    from ctprep_train.export import export

    again = export(reference, tmp_path / "again")
    assert json.loads((again / "training.json").read_text())["weights"] == "ema"
    for name, value in load_weights(again).items():
        torch.testing.assert_close(value, exported[name])

    # killed after step 2: resuming continues the average as if never stopped
    killed = tmp_path / "killed"
    (killed / "checkpoints").mkdir(parents=True)
    shutil.copytree(done[2], killed / "checkpoints" / done[2].name)
    launch(_args(shards, killed, "train.steps=4", "train.ckpt_every=2", "train.val_every=2", *EMA,
                 "--resume", "auto"))
    resumed = load_weights(killed / "encoder")
    for name in exported:
        torch.testing.assert_close(resumed[name], exported[name], rtol=1e-5, atol=1e-6)


def test_without_ema_the_export_is_the_trained_weights(shards, tmp_path):
    out = tmp_path / "plain"
    launch(_args(shards, out, "train.steps=2", "train.ckpt_every=2", "train.val_every=0"))
    ckpt_dir = complete_checkpoints(out)[-1][1]
    assert not (ckpt_dir / EMA_FILE).exists()
    exported, raw = load_weights(out / "encoder"), _raw_weights(ckpt_dir)
    for name in exported:
        torch.testing.assert_close(exported[name], raw[name].reshape(exported[name].shape))
    assert json.loads((out / "encoder" / "training.json").read_text())["weights"] == "trained"


def test_ema_with_zero3_is_refused_with_the_reason(shards, tmp_path):
    import os

    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    proc = subprocess.run([PYTHON, "trainer/train.py", *_args(shards, tmp_path / "z3", "train.steps=2", *EMA,
                                                              "train.deepspeed=configs/deepspeed/zero3.json")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert "train.ema_decay needs the full weights on every rank" in proc.stderr
