"""Hub sources read by byte range: a worker fetches its unit's tensors, never a whole shard.

The Hub serves a file at ``{endpoint}/{repo}/resolve/{commit}/{file}`` and honours ``Range``; a
small real HTTP server on 127.0.0.1 does the same for a checkpoint directory, and logs every
request, so the test sees which bytes were asked for. Only the small JSON files are in the Hub cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import safetensors.torch

from checkpoints import write_llama_checkpoint
from pipeline.job.plan import make_plan
from pipeline.job.unit import read_unit
from pipeline.sources.hub import resolve_hub
from sinq_ops import QuantConfig

REPO, COMMIT = "acme/ranged", "0123456789abcdef0123456789abcdef01234567"


class _Hub:
    """``resolve`` URLs of one repo at one commit, from ``root``; ``requests`` logs (method, file, Range)."""

    def __init__(self, root: Path) -> None:
        self.requests: list[tuple[str, str, str | None]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _serve(self, body: bool) -> None:
                if self.path.startswith(f"/api/models/{REPO}/tree/{COMMIT}"):
                    listing = json.dumps([{"type": "file", "path": p.name, "size": p.stat().st_size,
                                           "oid": hashlib.sha1(p.name.encode()).hexdigest()}
                                          for p in sorted(root.iterdir())]).encode()
                    hub.requests.append((self.command, "tree", None))
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(listing)))
                    self.end_headers()
                    self.wfile.write(listing)
                    return
                m = re.fullmatch(rf"/{REPO}/resolve/{COMMIT}/([\w.-]+)", self.path)
                path = root / m.group(1) if m else None
                hub.requests.append((self.command, m.group(1) if m else self.path, self.headers.get("Range")))
                if path is None or not path.is_file():
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = path.read_bytes()
                status, part = 200, data
                if body and (rng := re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))):
                    start, end = int(rng.group(1)), min(int(rng.group(2)), len(data) - 1)
                    status, part = 206, data[start:end + 1]
                self.send_response(status)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Content-Length", str(len(part) if body else len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(part)

            def do_GET(self) -> None:
                self._serve(True)

            def do_HEAD(self) -> None:
                self._serve(False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def hub(tmp_path: Path):
    from huggingface_hub import constants

    src = write_llama_checkpoint(tmp_path / "src", layers=2, hidden=128, intermediate=256, vocab=256, shards=2, seed=4)
    server = _Hub(src)
    snapshot = Path(constants.HF_HUB_CACHE) / "models--acme--ranged" / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for small in ("config.json", "model.safetensors.index.json"):  # small files are downloaded whole, as always
        shutil.copy(src / small, snapshot / small)
    (snapshot.parents[1] / "refs").mkdir(exist_ok=True)
    (snapshot.parents[1] / "refs" / "main").write_text(COMMIT)
    yield src, server
    server.server.shutdown()
    shutil.rmtree(snapshot.parents[1])


def test_hub_tensors_are_read_by_range_without_downloading_a_shard(hub, monkeypatch) -> None:
    from huggingface_hub import constants

    src, server = hub
    # Resolved from the cache, as offline; then read online from this Hub (HF_ENDPOINT on a real run).
    source = dataclasses.replace(resolve_hub(f"{REPO}@main"), endpoint=server.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    plan = make_plan(source, QuantConfig())
    layer = next(u for u in plan.units if u.name == "model.layers.1")
    raw = read_unit(source, layer)
    tensors = {}
    for f in src.glob("*.safetensors"):
        tensors.update(safetensors.torch.load_file(f))
    for task, stored in zip(layer.tasks, raw):
        assert stored[0].equal(tensors[task.source_name])
    gets = [(f, r) for method, f, r in server.requests if method == "GET" and f.endswith(".safetensors")]
    assert gets and all(r is not None for _, r in gets)  # every shard byte came as a ranged GET
    sizes = {f.name: f.stat().st_size for f in src.glob("*.safetensors")}
    fetched = sum(int(b) - int(a) + 1 for _, r in gets for a, b in [r.removeprefix("bytes=").split("-")])
    assert fetched < 0.7 * sum(sizes.values())
    cached = Path(constants.HF_HUB_CACHE) / "models--acme--ranged" / "snapshots" / COMMIT
    # Small files (config, index, the assets checked at plan time) are cached; no shard ever is.
    assert "model.safetensors.index.json" in os.listdir(cached)
    assert not [n for n in os.listdir(cached) if n.endswith(".safetensors")]
