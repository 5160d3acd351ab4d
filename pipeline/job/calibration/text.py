"""Calibration text to token ids: a file from local disk, object storage or a Hub dataset, cut by the
model's own tokenizer into consecutive sequences.

The text's sha256 and the sizes go into the job's run key, so a different text or count is a
different job and never reuses another's staged statistics.
"""

from __future__ import annotations

import hashlib
import json

import torch

from ...io.storage import Location, StorageOptions
from ...sources import Source
from .options import CalibrationOptions


def read_text(spec: str, storage: StorageOptions | None = None) -> tuple[str, str]:
    """The text of ``spec`` and the sha256 of its bytes: a ``.txt`` file as it is, a ``.jsonl`` file's
    ``text`` fields joined by blank lines."""
    parent, _, name = spec.rpartition("/")
    if not name:
        raise ValueError(f"--calibration {spec!r} names no file")
    try:
        data = Location(parent or ".", storage or StorageOptions()).read_bytes(name)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--calibration {spec}: cannot be read ({str(exc).splitlines()[0] if str(exc) else exc})") \
            from None
    try:
        text = data.decode("utf-8")
        if name.endswith(".jsonl"):
            text = "\n\n".join(str(json.loads(line)["text"]) for line in text.splitlines() if line.strip())
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--calibration {spec}: not UTF-8 text (or JSON lines with a text field): {exc}") from None
    return text, hashlib.sha256(data).hexdigest()


_CHARS_PER_TOKEN = 6  # a first guess at the prefix needed; doubled until it holds enough tokens
_CUT_MARGIN = 64  # tokens past those needed, so that the prefix's cut cannot reach them


def token_ids(source: Source, text: str, options: CalibrationOptions, spec: str) -> torch.Tensor:
    """``[sequences, length]`` consecutive token ids of ``text`` by ``source``'s tokenizer."""
    from ...sources.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(source)
    need = options.tokens
    # A large corpus is not tokenized whole: a prefix long enough for the tokens needed is, and the
    # last tokens of that prefix, which its cut may have changed (a split word, an end-of-text
    # token), are never among those taken.
    chars = need * _CHARS_PER_TOKEN
    while True:
        ids = torch.tensor(tokenizer(text[:chars], return_tensors=None)["input_ids"], dtype=torch.long)
        if chars >= len(text) or ids.numel() >= need + _CUT_MARGIN:
            break
        chars *= 2
    if ids.numel() < need:
        raise ValueError(f"--calibration {spec}: {ids.numel()} tokens, fewer than --calibration-sequences "
                         f"{options.sequences} x --calibration-length {options.length} = {need}; pass a longer text "
                         "or fewer or shorter sequences")
    return ids[:need].view(options.sequences, options.length)


def synthetic_ids(model_config: dict, options: CalibrationOptions, seed: int = 0) -> torch.Tensor:
    """Token ids for a synthetic source, which has no tokenizer: uniform over the vocabulary, from a seed."""
    text = model_config.get("text_config") or model_config
    vocab = int(text.get("vocab_size") or 32000)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (options.sequences, options.length), generator=g)
