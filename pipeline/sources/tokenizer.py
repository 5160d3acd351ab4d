"""A source's own tokenizer, for the text that evaluation and calibration cut into tokens."""

from __future__ import annotations

import tempfile
from pathlib import Path

from .base import Source

# What AutoTokenizer reads from a checkpoint directory; config.json names the model type where
# tokenizer_config.json does not name the class. One of TOKENIZER_VOCAB must be there.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "config.json")
TOKENIZER_VOCAB = ("tokenizer.json", "tokenizer.model", "vocab.json")


def load_tokenizer(source: Source):
    """The source's tokenizer, from its tokenizer files copied to a temporary directory (so every
    kind of source, local, object storage or Hub at its exact commit, loads the same way), never
    with the repository's own code: a tokenizer that needs it is refused."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="sinq-tokenizer-") as tmp:
        for name in TOKENIZER_FILES:
            if source.exists(name):
                Path(tmp, name).write_bytes(source.read_bytes(name))
        try:
            return AutoTokenizer.from_pretrained(tmp, trust_remote_code=False)
        except (ValueError, OSError, RecursionError) as exc:
            if "trust_remote_code" in str(exc):
                raise ValueError(f"{source.spec}: its tokenizer needs the repository's own code (auto_map), which "
                                 "this tool never runs") from None
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"{source.spec}: its tokenizer cannot be loaded ({text})") from None
