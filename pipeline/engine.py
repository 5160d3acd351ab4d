"""Perplexity from a serving engine's own prompt log-probabilities, over its OpenAI-compatible HTTP API.

A compressed-tensors output is meant to be served; its quality is what the engine computes from it
(its kernels, its dtype, its fused layers), not what a PyTorch reference computes. vLLM returns,
for a completion request with ``prompt_logprobs: 0``, the log-probability of every prompt token
given the ones before it. Prompts go as token ids, so the engine's tokenizer never re-tokenizes the
text: the windows are exactly those the in-process evaluation uses.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

import torch

from .evaluate import Perplexity


class EngineError(OSError):
    """The engine could not be reached, or answered something other than prompt log-probabilities."""


# The engine's API key, sent as a bearer token (vLLM's --api-key); never part of the URL, never logged.
API_KEY_ENV = "SINQ_ENGINE_API_KEY"


@dataclass(frozen=True)
class Engine:
    """An OpenAI-compatible server, e.g. ``http://127.0.0.1:8000``, and the model it serves."""

    url: str
    model: str = ""  # the served model's id; the server's only model when empty
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("--engine must be an http:// or https:// URL such as http://127.0.0.1:8000")
        if "@" in parts.netloc or parts.query or parts.fragment:
            # Said without repeating the URL: it may hold a password.
            raise ValueError(f"--engine takes a plain URL, with no user, password or query in it; pass the "
                             f"engine's API key in ${API_KEY_ENV}")
        try:
            parts.port
        except ValueError:
            raise ValueError("--engine has a port that is not a number") from None

    @property
    def public_url(self) -> str:
        return self.url.rstrip("/")

    def _call(self, path: str, body: dict | None = None) -> dict:
        url = self.url.rstrip("/") + path
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if os.environ.get(API_KEY_ENV):
            headers["Authorization"] = f"Bearer {os.environ[API_KEY_ENV]}"
        request = urllib.request.Request(url, data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300].replace("\n", " ")
            raise EngineError(f"{self.public_url}{path}: HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            raise EngineError(f"{self.public_url}{path}: {getattr(exc, 'reason', exc)}") from None

    def served(self) -> dict:
        """The entry of ``/v1/models`` for the model requests name (``model``, else the server's only
        one): its ``id``, and as vLLM lists them its ``root`` (what it loaded) and ``max_model_len``."""
        listed = {m.get("id"): m for m in self._call("/v1/models").get("data", []) if isinstance(m, dict)}
        if self.model:
            if self.model not in listed:
                raise EngineError(f"{self.public_url} serves {sorted(listed)}, not {self.model!r}")
            return listed[self.model]
        if len(listed) != 1:
            raise EngineError(f"{self.public_url} serves {len(listed)} models {sorted(listed)}; name one")
        return next(iter(listed.values()))

    def served_model(self) -> str:
        return str(self.served()["id"])

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


def check_serves(engine: Engine, output: str, ctx: int) -> str:
    """The model id under which ``engine`` serves ``output``, refusing an engine that loaded another
    local directory, or whose context is shorter than a window of ``ctx`` tokens."""
    entry = engine.served()
    root = str(entry.get("root") or "")
    if root and "://" not in output and os.path.isdir(root) and os.path.realpath(root) != os.path.realpath(output):
        raise EngineError(f"{engine.public_url} serves {root}, not {output}")
    limit = entry.get("max_model_len")
    if isinstance(limit, int) and limit < ctx + 1:  # the window, and the one token a completion must generate
        raise EngineError(f"{engine.public_url} serves {entry['id']} with max_model_len {limit}, shorter than a "
                          f"window of {ctx} tokens; start it with --max-model-len {ctx + 1} or pass a smaller --ctx")
    return str(entry["id"])
