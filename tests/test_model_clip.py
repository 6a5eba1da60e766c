"""CTCLIP end to end (tiny on CPU): configs, shapes, gradients, checkpointing, ablations, save/load."""

import json

import pytest
import torch

from tests.model_helpers import make_batch
from ctprep_train.losses import MultiTaskLoss
from ctprep_train.model import create_model, get_model_config, list_models, load_pretrained, save_pretrained


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("tiny")


@pytest.fixture(scope="module")
def batch():
    return make_batch()


def test_every_registered_config_builds_on_meta_with_expected_size():
    assert {"tiny", "base", "large"} <= set(list_models())
    millions = {}
    for name in list_models():
        model = create_model(name, device="meta")
        millions[name] = sum(p.numel() for p in model.visual.parameters()) / 1e6
    # ViT-B/L blocks (86M / 304M) + per-block region cross-attention (4 C^2 each), a 16x32x32
    # learned position table, the anatomy CNN and the heads.
    assert 120 < millions["base"] < 145, millions
    assert 400 < millions["large"] < 470, millions
    assert 1 < millions["tiny"] < 3, millions
    base = get_model_config("base")
    assert (base.vision.width, base.vision.depth, base.vision.num_heads) == (768, 12, 12)


def test_tiny_forward_shapes_and_finite(tiny, batch):
    tiny.eval()
    with torch.no_grad():
        out = tiny(batch)
    b, r, s = 2, 4, 3
    e = tiny.cfg.embed_dim
    k = tiny.cfg.vision.num_evidence_tokens
    shapes = {
        "image_embed": (b, e), "text_embed": (b, e), "logit_scale": (),
        "region_embed": (b, r, e), "region_present": (b, r), "region_text_embed": (b, r, e),
        "region_text_valid": (b, r), "step_evidence": (b, k, e), "evidence_attn": (b, k, 4 * 4 * 4),
        "step_embed": (b, s, e), "step_valid": (b, s), "label_logits": (b, 18),
    }
    for key, shape in shapes.items():
        assert tuple(out[key].shape) == shape, key
        if out[key].dtype.is_floating_point:
            assert torch.isfinite(out[key]).all(), key
    torch.testing.assert_close(out["image_embed"].norm(dim=-1), torch.ones(b))
    assert out["step_valid"].tolist() == [[True, True, False], [True, True, True]]
    assert (out["step_embed"][0, 2] == 0).all()
    assert out["region_present"].all()
    torch.testing.assert_close(tiny.encode_image(batch), out["image_embed"])
    torch.testing.assert_close(tiny.encode_text(batch["report_ids"], batch["report_attn"]), out["text_embed"])


def test_assignment_from_mask_when_regions_absent(tiny, batch):
    tiny.eval()
    no_regions = {k: v for k, v in batch.items() if k != "regions"}
    with torch.no_grad():
        a, b = tiny.encode_image(batch), tiny.encode_image(no_regions)
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)  # regions.npy is float16


def test_gradient_reaches_every_trainable_parameter(tiny, batch):
    tiny.train()
    tiny.zero_grad()
    total, terms = MultiTaskLoss()(tiny(batch), batch)
    total.backward()
    assert set(terms) == {"clip", "region", "step", "labels"}
    missing = [n for n, p in tiny.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, missing
    frozen = [n for n, p in tiny.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith("text.transformer.") for n in frozen)  # tiny freezes 4 of 6 layers
    assert not any(".layer.5." in n for n in frozen)
    assert tiny.text.transformer.embeddings.training is False  # frozen layers run without dropout


def test_grad_checkpointing_same_output_and_grads(batch):
    torch.manual_seed(0)
    model = create_model("tiny", **{"vision.drop_path_rate": 0.0, "text.freeze_layers": -1})
    model.eval()  # no dropout: both runs must match exactly
    results = []
    for ckpt in (False, True):
        model.visual.set_grad_checkpointing(ckpt)
        model.zero_grad()
        out = model(batch)
        MultiTaskLoss()(out, batch)[0].backward()
        results.append((out["image_embed"].detach(), {n: p.grad.clone() for n, p in model.visual.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("overrides", [
    {"vision.attention.slice_bias": False},
    {"vision.attention.region_attention": False},
    {"vision.attention.region_attention": False, "vision.anatomy.enabled": False},
    {"vision.attention.hybrid": "gated", "vision.patch.pos_embed": "sinusoidal", "vision.global_pool": "avg"},
])
def test_ablation_switches_build_and_run(overrides, batch):
    model = create_model("tiny", **{"text.freeze_layers": -1, **overrides})
    out = model(batch)
    total, _ = MultiTaskLoss()(out, batch)
    total.backward()
    assert torch.isfinite(total)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, missing  # no dead parameters in any ablation (DDP/ZeRO would choke)
    vis = model.visual
    assert (vis.blocks[0].attn.self_attn.slice_bias_table is None) == (not model.cfg.vision.attention.slice_bias)
    assert (vis.blocks[0].attn.region_attn is None) == (not model.cfg.vision.attention.region_attention)
    assert (vis.anatomy is None) == (not model.cfg.vision.anatomy.enabled)


def test_unknown_options_fail_loudly():
    with pytest.raises(ValueError, match="valid choices: .*tiny"):
        create_model("huge")
    with pytest.raises(ValueError, match="valid choices"):
        get_model_config("tiny", **{"vision.attention.kernel": "fast"})
    with pytest.raises(ValueError, match="valid choices"):
        get_model_config("tiny", **{"vision.widht": 64})
    with pytest.raises(ValueError, match="anatomy.enabled"):
        get_model_config("tiny", **{"vision.anatomy.enabled": False})
    with pytest.raises(ValueError, match="divisible"):
        get_model_config("tiny", **{"vision.num_heads": 5})


def test_save_load_round_trip(tiny, batch, tmp_path):
    tiny.eval()
    save_pretrained(tiny, tmp_path / "encoder")
    assert sorted(p.name for p in (tmp_path / "encoder").iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "encoder" / "config.json").read_text())
    assert cfg["text"]["hf_config"]["model_type"] == "bert"  # loading needs no text path
    loaded = load_pretrained(tmp_path / "encoder").eval()
    with torch.no_grad():
        a, b = tiny(batch), loaded(batch)
    for key in ("image_embed", "text_embed", "region_embed", "step_embed", "step_evidence", "label_logits"):
        torch.testing.assert_close(a[key], b[key], msg=key)
    with pytest.raises(FileNotFoundError):
        load_pretrained(tmp_path / "missing")


def test_bf16_weights_forward_backward(batch):
    # DeepSpeed bf16 converts the module, not the inputs: int16 HU and float masks must still work.
    model = create_model("tiny", **{"text.freeze_layers": -1}).to(torch.bfloat16)
    out = model(batch)
    assert out["image_embed"].dtype == torch.bfloat16
    total, _ = MultiTaskLoss()({k: v.float() if v.is_floating_point() else v for k, v in out.items()}, batch)
    total.backward()
    assert torch.isfinite(total)
    assert all(torch.isfinite(p.grad).all() for p in model.visual.parameters() if p.grad is not None)
