"""Perplexity on non-overlapping token windows (the protocol of the SINQ, GPTQ and AWQ papers):
the text is tokenized once, cut into windows of ``ctx`` tokens from the start, and
``exp(mean over windows of the mean next-token cross-entropy)`` is reported."""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .io.storage import Location, StorageOptions
from .output.manifest import MANIFEST_NAME, load_manifest
from .sources import Source, open_source
from .sources.tokenizer import TOKENIZER_VOCAB


@dataclass
class Perplexity:
    ppl: float
    nll: float
    windows: int
    tokens: int
    seconds: float


def text_windows(tokenizer, text: str, ctx: int, windows: int | None = None) -> torch.Tensor:
    """``[n, ctx]`` token ids: the first ``windows`` full windows (all of them if None)."""
    ids = torch.tensor(tokenizer(text, return_tensors=None)["input_ids"], dtype=torch.long)
    n = ids.numel() // ctx
    if windows is not None:
        n = min(n, windows)
    if n == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {ctx}")
    return ids[: n * ctx].view(n, ctx)


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, device: str | torch.device = "cpu") -> Perplexity:
    t0 = time.perf_counter()
    total = 0.0
    for w in windows:
        ids = w.unsqueeze(0).to(device)
        logits = model(input_ids=ids).logits[0, :-1].float()
        total += float(F.cross_entropy(logits, ids[0, 1:], reduction="mean"))
    nll = total / len(windows)
    return Perplexity(math.exp(nll), nll, len(windows), windows.numel(), time.perf_counter() - t0)


def text_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def report(source: Perplexity, quantized: Perplexity, *, text: str, ctx: int) -> dict:
    return {
        "text": str(text), "text_sha256": text_digest(text), "ctx": ctx, "windows": source.windows,
        "tokens": source.tokens, "source": asdict(source), "quantized": asdict(quantized),
        "ppl_ratio": quantized.ppl / source.ppl,
    }


def check_evaluable(model: str, storage: StorageOptions | None = None) -> Source:
    """Refuse, before any work, a source that perplexity cannot be measured on: a synthetic one
    (before any I/O), one that does not resolve, or one without tokenizer files. Returns the
    resolved source (a Hub repo at an exact commit); reads no weights."""
    if model.startswith("synthetic://"):
        raise ValueError(f"{model}: a synthetic source has no tokenizer and no text it models; "
                         "evaluate a real checkpoint instead")
    source = open_source(model, storage)
    if not any(source.exists(name) for name in TOKENIZER_VOCAB):
        raise ValueError(f"{model}: no tokenizer files ({', '.join(TOKENIZER_VOCAB)}); perplexity needs the "
                         "model's tokenizer")
    return source


def pinned_spec(model: str, quantized: Location) -> str:
    """``model``, pinned to the commit the output was quantized from where the output's manifest
    names this same Hub spec: a branch or tag that moved since still evaluates that commit.
    A URL (``s3://``, ``synthetic://``) comes back as it is, without a look at the output."""
    if "://" in model or not quantized.exists(MANIFEST_NAME):
        return model
    source = load_manifest(quantized).get("source", {})
    if source.get("spec") == model and source.get("repo_id") and source.get("commit"):
        return f"{source['repo_id']}@{source['commit']}"
    return model
