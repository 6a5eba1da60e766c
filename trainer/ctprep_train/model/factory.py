"""create_model / list_models / save_pretrained / load_pretrained (open_clip ``factory.py`` style).

A model name is a YAML file in ``configs/model/`` (``tiny``, ``base``, ``large``); a path to a YAML
file or to a ``save_pretrained`` directory works too. Overrides are dotted keys:
``create_model("tiny", **{"vision.depth": 2, "vision.attention.slice_bias": False})``.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch

from ctprep.atomic import atomic_path, atomic_write_json
from ctprep.typed_config import read_yaml

from .clip import CTCLIP
from .config import CTCLIPConfig, apply_overrides, from_dict, to_dict, validate

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def model_config_dir() -> Path:
    """``configs/model/`` of the repository (the package is installed editable from it)."""
    from ctprep.config import CONFIG_ROOT  # the repository's configs/, or the installed package data

    return CONFIG_ROOT / "model"


def list_models() -> list[str]:
    """Names of the model configs in ``configs/model/``."""
    return sorted(p.stem for p in model_config_dir().glob("*.yaml"))


def _read_config_dict(name_or_path: str) -> dict:
    path = Path(name_or_path)
    if path.is_dir():
        data = json.loads((path / CONFIG_FILE).read_text())
        text = data.get("text")
        if isinstance(text, dict) and text.get("path") and not Path(text["path"]).is_absolute():
            # A self-contained export (ctprep_train.export) names its own folder: "." = beside config.json.
            text["path"] = str((path / text["path"]).resolve())
        return data
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return read_yaml(path)
    candidate = model_config_dir() / f"{name_or_path}.yaml"
    if not candidate.is_file():
        raise ValueError(f"unknown model {name_or_path!r}; valid choices: {', '.join(list_models())} "
                         "(or a .yaml file, or a save_pretrained directory)")
    data = read_yaml(candidate)
    data.setdefault("name", name_or_path)
    return data


def get_model_config(name_or_path: str, **overrides: Any) -> CTCLIPConfig:
    """The validated CTCLIPConfig for a name/path plus dotted-key overrides."""
    data = apply_overrides(copy.deepcopy(_read_config_dict(name_or_path)), overrides)
    return validate(from_dict(CTCLIPConfig, data))


def create_model(name_or_path: str, device: str | torch.device | None = None, **overrides: Any) -> CTCLIP:
    """Build a CTCLIP from a config name/path with dotted-key overrides.

    ``device="meta"`` builds the architecture without memory or weight files (parameter counts).
    """
    cfg = get_model_config(name_or_path, **overrides)
    if device is not None and torch.device(device).type == "meta":
        with torch.device("meta"):
            return CTCLIP(cfg, load_text_weights=False)
    model = CTCLIP(cfg)
    return model.to(device) if device is not None else model


def save_pretrained(model: CTCLIP, directory: str | Path) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (incl. the text tower's HF config) to ``directory``."""
    from safetensors.torch import save_file

    model = getattr(model, "module", model)  # DDP / DeepSpeed engine wrappers
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(model.cfg)
    cfg.text.hf_config = model.text.hf_config_dict()
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # Weights first, config last: a folder with config.json has the weights that config describes.
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, 0o644)  # safetensors writes 0600; an export is meant to be shared
    atomic_write_json(directory / CONFIG_FILE, to_dict(cfg), indent=2)
    return directory


def load_pretrained(directory: str | Path, device: str | torch.device = "cpu", **overrides: Any) -> CTCLIP:
    """Rebuild a CTCLIP from ``save_pretrained`` output; needs no DeepSpeed, no text path, no network.

    The text tower is built from ``text.hf_config``; a relative ``text.path`` (``"."`` in a
    ``ctprep_train.export`` folder, which holds the tokenizer files) is resolved against ``directory``.
    For preprocessing and prompts too, use ``ctprep_train.inference.load_encoder``.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{directory / WEIGHTS_FILE} not found (expected save_pretrained output)")
    cfg = get_model_config(str(directory), **overrides)
    model = CTCLIP(cfg, load_text_weights=False)
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=True)
    return model.to(device)
