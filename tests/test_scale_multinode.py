"""Multi-node training: the hostfile, the ZeRO-3 `large` config, and the shard split across ranks.

The rank tests run two real gloo ranks (``torch.multiprocessing.spawn``) with the trainer's own
loader (``ctprep_train.data.build_train_loader``) over one epoch and check that no sample is read twice
and that every sample is read, under the loader's equal-steps rule. One spawn serves all
scenarios (process start + imports dominate the cost on a 2-core machine).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORLD = 2

# name -> (train shard sizes, DataConfig fields); steps per epoch follow the equal-steps rule.
SCENARIOS = {
    "even_in_process": ([3, 3, 3, 3], {"batch_size": 2, "num_workers": 0, "buffer_size": 3, "seed": 7}),
    "even_two_loader_workers": ([2] * 8, {"batch_size": 1, "num_workers": 2, "buffer_size": 3, "seed": 7}),
    "uneven": ([4, 4, 4, 1], {"batch_size": 1, "num_workers": 0, "buffer_size": 2, "seed": 3}),
}


def steps_per_epoch(total_samples: int, world_size: int, batch_size: int) -> int:
    """The equal-steps rule: every rank takes the same number of batches per epoch."""
    return total_samples // (world_size * batch_size)


@pytest.fixture(scope="module")
def epoch_ids(tmp_path_factory) -> dict[str, list[list[str]]]:
    """Case ids read per rank in one epoch, per scenario: {name: [rank0 ids, rank1 ids]}."""
    import torch.multiprocessing as mp

    from tests.scale_helpers import epoch_ids_on_rank
    from ctprep_train.testing import write_test_shards

    root = tmp_path_factory.mktemp("ranks")
    scenarios = []
    for name, (sizes, data) in SCENARIOS.items():
        write_test_shards(root / name / "shards", {"train": sizes, "valid": [2]})
        (root / name / "ids").mkdir()
        steps = steps_per_epoch(sum(sizes), WORLD, data["batch_size"])
        scenarios.append({"shards": str(root / name / "shards"), "data": data, "steps": steps, "out": str(root / name / "ids")})
    mp.spawn(epoch_ids_on_rank, args=(WORLD, str(root / "pg_init"), scenarios), nprocs=WORLD, join=True)
    out = {}
    for name, scenario in zip(SCENARIOS, scenarios):
        per_rank = [json.loads(Path(scenario["out"], f"rank{r}.json").read_text()) for r in range(WORLD)]
        assert [len(b) for b in per_rank] == [scenario["steps"]] * WORLD, f"{name}: unequal step counts"
        out[name] = [[case for batch in rank for case in batch] for rank in per_rank]
    return out


def test_hostfile_example_parses_with_deepspeeds_own_reader():
    from deepspeed.launcher.runner import fetch_hostfile

    hosts = fetch_hostfile(str(REPO / "configs/hostfile.example"))
    assert len(hosts) >= 2 and all(slots >= 1 for slots in hosts.values())


@pytest.mark.parametrize(
    "name",
    [
        "even_in_process",
        "even_two_loader_workers",
    ],
)
def test_two_ranks_read_every_sample_exactly_once_per_epoch(epoch_ids, name):
    ids = epoch_ids[name]
    for rank, rank_ids in enumerate(ids):
        assert len(rank_ids) == len(set(rank_ids)), f"rank {rank} read a sample twice in one epoch: {rank_ids}"
    assert not set(ids[0]) & set(ids[1]), "the two ranks read the same sample"
    total = sum(SCENARIOS[name][0])
    assert len(set(ids[0]) | set(ids[1])) == total, "some sample was never read in the epoch"


def test_uneven_shards_keep_equal_steps_and_repeat_only_after_a_rank_runs_out(epoch_ids):
    """Shards 4,4,4,1 over 2 ranks: one rank holds 5 samples, the other 8, and both take 6 steps.

    The short rank wraps to its next pass (a repeat) rather than stalling the other rank; nothing
    is ever read by both ranks, and a rank repeats a sample only after reading all of its own.
    """
    ids = epoch_ids["uneven"]
    assert not set(ids[0]) & set(ids[1])
    for rank_ids in ids:
        first_repeat = next((i for i, c in enumerate(rank_ids) if c in rank_ids[:i]), None)
        if first_repeat is not None:
            owned = len(set(rank_ids))
            assert first_repeat >= owned, f"repeat at {first_repeat} before reading all {owned} own samples"


def test_large_zero3_config_loads_with_the_trainers_loader():
    import torch

    from ctprep_train.config import load_config, load_deepspeed_config
    from ctprep_train.model import create_model

    cfg = load_config(REPO / "configs/train/large_zero3.yaml")
    ds = load_deepspeed_config(cfg)
    assert ds["zero_optimization"]["stage"] == 3
    bf16 = ds.get("bf16", {}).get("enabled") or ds.get("torch_autocast", {}).get("dtype") == "bfloat16"
    assert bf16, "the large run is meant for bf16 on H200"
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_micro_batch_size_per_gpu"] == cfg.data.batch_size
    assert cfg.model.name == "large"
    model = create_model(cfg.model.name, device="meta", **cfg.model.overrides)  # architecture only
    vision_params = sum(p.numel() for p in model.visual.parameters())
    assert 300e6 < vision_params < 600e6, vision_params  # ViT-L-sized (+ region attention): why ZeRO-3 pays off
    assert all(p.device == torch.device("meta") for p in model.parameters())
