"""Perplexity from a serving engine's own prompt log-probabilities, over its OpenAI-compatible HTTP API.

A compressed-tensors output is meant to be served; its quality is what the engine computes from it
(its kernels, its dtype, its fused layers), not what a PyTorch reference computes. vLLM returns,
for a completion request with ``prompt_logprobs: 0``, the log-probability of every prompt token
given the ones before it. Prompts go as token ids, so the engine's tokenizer never re-tokenizes the
text: the windows are exactly those the in-process evaluation uses.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

import torch

from .evaluate import Perplexity


class EngineError(OSError):
    """The engine could not be reached, or answered something other than prompt log-probabilities."""


@dataclass(frozen=True)
class Engine:
    """An OpenAI-compatible server, e.g. ``http://127.0.0.1:8000``, and the model it serves."""

    url: str
    model: str = ""  # the served model's id; the server's only model when empty
    timeout_s: float = 600.0

    @property
    def public_url(self) -> str:
        """The URL without any user or password in it, as reports may show it."""
        parts = urllib.parse.urlsplit(self.url)
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))

    def _call(self, path: str, body: dict | None = None) -> dict:
        url = self.url.rstrip("/") + path
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300].replace("\n", " ")
            raise EngineError(f"{self.public_url}{path}: HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise EngineError(f"{self.public_url}{path}: {getattr(exc, 'reason', exc)}") from None

    def served_model(self) -> str:
        """The model id requests name: ``model``, checked against what the server lists."""
        listed = [m.get("id") for m in self._call("/v1/models").get("data", [])]
        if self.model:
            if self.model not in listed:
                raise EngineError(f"{self.public_url} serves {listed}, not {self.model!r}")
            return self.model
        if len(listed) != 1:
            raise EngineError(f"{self.public_url} serves {len(listed)} models {listed}; name one")
        return listed[0]

    def prompt_logprobs(self, ids: list[int], model: str) -> list[float]:
        """``log p(ids[i] | ids[:i])`` for i >= 1, as the engine computes it."""
        reply = self._call("/v1/completions", {"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0,
                                               "prompt_logprobs": 0})
        try:
            got = reply["choices"][0]["prompt_logprobs"]
            return [float(got[i][str(t)]["logprob"]) for i, t in enumerate(ids) if i > 0]
        except (KeyError, IndexError, TypeError) as exc:
            raise EngineError(f"{self.public_url}/v1/completions: no prompt log-probabilities in the reply "
                              f"({type(exc).__name__}: {exc})") from None


def engine_perplexity(engine: Engine, windows: torch.Tensor) -> Perplexity:
    """Perplexity over ``windows`` ([n, ctx] token ids) as ``pipeline.evaluate.perplexity`` defines it,
    from the engine's prompt log-probabilities."""
    t0 = time.perf_counter()
    model = engine.served_model()
    total = 0.0
    for w in windows:
        logprobs = engine.prompt_logprobs([int(t) for t in w], model)
        total += -sum(logprobs) / len(logprobs)
    nll = total / len(windows)
    return Perplexity(math.exp(nll), nll, len(windows), windows.numel(), time.perf_counter() - t0)
