"""Untrusted checkpoints and damaged outputs: nothing is read from outside the source, no
repository code runs, nothing that does not verify is accepted, and one job holds a destination.

Refusals happen at plan time, before Ray; the jobs that must run do so in-process (what is
tested here is the driver's handling of files, not the cluster)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from checkpoints import write_llama_checkpoint
from pipeline_checks import assert_cli_refuses
from jobs import quantize as cli
from pipeline.io.storage import Location
from pipeline.job.errors import JobError
from pipeline.job.options import JobOptions
from pipeline.job.run import run_job
from pipeline.loader import load_quantized, load_source
from pipeline.output.manifest import MANIFEST_NAME, IncompleteOutput, verify

ROOT = Path(__file__).resolve().parents[1]
SECRET = b"aws_secret_access_key = do-not-publish-0123456789"


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    src = write_llama_checkpoint(tmp_path_factory.mktemp("good") / "m", layers=1, hidden=64, intermediate=128,
                                 vocab=64, shards=2, seed=9)
    (src / "LICENSE").write_text("Apache-2.0\n")
    return src


def _job(src: Path, out: Path, **settings) -> dict:
    return run_job(JobOptions.from_settings({"model": str(src), "out": str(out), **settings}), log=lambda _: None,
                   in_process=True)


@pytest.fixture(scope="module")
def done(good: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("done") / "out"
    _job(good, out)
    return out


def _copy(src: Path, tmp_path: Path, name: str = "src") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _tree_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


# Containment ------------------------------------------------------------------------------------

def test_an_index_entry_outside_the_source_is_never_read(good: Path, tmp_path: Path, capsys) -> None:
    src = _copy(good, tmp_path)
    shutil.copy(src / "model-00002-of-00002.safetensors", tmp_path / "outside.safetensors")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: "../outside.safetensors" if v.startswith("model-00002") else v
                           for k, v in index["weight_map"].items()}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_cli_refuses(src, tmp_path / "out", capsys, "model.safetensors.index.json", "'../outside.safetensors'",
             "leads outside the checkpoint")


@pytest.mark.parametrize("asset", ["LICENSE", "tokenizer_config.json", "README.md", "shard"])
def test_a_link_out_of_the_source_never_reaches_the_output(asset: str, good: Path, tmp_path: Path, capsys) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_bytes(SECRET)
    src = _copy(good, tmp_path)
    name = "model-00001-of-00002.safetensors" if asset == "shard" else asset
    target = tmp_path / "elsewhere.safetensors" if asset == "shard" else secret
    if asset == "shard":
        shutil.copy(src / name, target)  # a valid shard, but not the checkpoint's own file
    (src / name).unlink(missing_ok=True)
    (src / name).symlink_to(target)
    out = tmp_path / "out"
    assert_cli_refuses(src, out, capsys, f"{src}/{name} is a link to a file outside the checkpoint")
    assert not out.exists() or SECRET not in _tree_bytes(out)


def test_special_and_oversized_files_are_refused_without_reading_them(good: Path, tmp_path: Path, capsys) -> None:
    src = _copy(good, tmp_path)
    (src / "config.json").unlink()
    os.mkfifo(src / "config.json")  # opening it would block forever
    t0 = time.perf_counter()
    assert_cli_refuses(src, tmp_path / "o1", capsys, f"{src}/config.json is a FIFO, not a regular file")
    assert time.perf_counter() - t0 < 30

    src = _copy(good, tmp_path, "big")
    with open(src / "tokenizer.json", "wb") as f:  # sparse: 300 MB of junk without writing it
        f.truncate(300 * 2**20)
    assert_cli_refuses(src, tmp_path / "o2", capsys, f"{src}/tokenizer.json has 314572800 bytes, over the 64 MiB cap")


def test_nested_json_and_oversized_headers_fail_in_one_line(good: Path, tmp_path: Path, capsys) -> None:
    src = _copy(good, tmp_path)
    (src / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    assert_cli_refuses(src, tmp_path / "o1", capsys, f"{src}: config.json nests its JSON too deeply")

    src = _copy(good, tmp_path, "header")
    shard = src / "model-00002-of-00002.safetensors"
    length = 101 * 2**20
    with open(shard, "wb") as f:
        f.write(struct.pack("<Q", length))
        f.truncate(8 + length + 16)
    assert_cli_refuses(src, tmp_path / "o2", capsys, f"{shard}: header of {length} bytes, over the 100 MiB cap")


def test_a_config_naming_more_layers_than_the_checkpoint_fails_before_building(good: Path, tmp_path: Path,
                                                                              capsys) -> None:
    src = _copy(good, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 5000}))
    t0 = time.perf_counter()
    assert_cli_refuses(src, tmp_path / "out", capsys, "names 5000 decoder layers (num_hidden_layers)", "at most 1 layers")
    assert time.perf_counter() - t0 < 20  # building 5000 layers takes about 40 s


def test_an_output_over_or_inside_its_source_isassert_cli_refuses(good: Path, tmp_path: Path, capsys) -> None:
    src = _copy(good, tmp_path)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    for out, how in ((src, "is the source itself"), (src / "q", "lies inside the source"),
                     (tmp_path, "holds the source")):
        assert_cli_refuses(src, out, capsys, f"--out {out} {how}")
    link = tmp_path / "alias"
    link.symlink_to(src)
    assert_cli_refuses(src, link, capsys, "is the source itself")
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_a_hub_cache_snapshot_reads_its_blobs(good: Path, tmp_path: Path) -> None:
    """The one allowed link out of a source: a cache snapshot's links into its repository's blobs."""
    repo = tmp_path / "models--acme--tiny"
    snap = repo / "snapshots" / ("ab" * 20)
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in good.iterdir():
        blob = repo / "blobs" / f"blob-{f.name}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", blob.name))
    manifest = _job(snap, tmp_path / "out")
    assert {"LICENSE", "tokenizer_config.json"} <= {f["name"] for f in manifest["files"]}


# No repository code -----------------------------------------------------------------------------

def test_no_repository_code_runs_even_when_answered_yes(good: Path, tmp_path: Path) -> None:
    """``auto_map`` entries naming the source's own modules, which would leave a marker on import; the
    tool is asked in a subprocess whose stdin answers "y" to transformers' question."""
    src = _copy(good, tmp_path)
    marker = tmp_path / "code-ran"
    trap = f"open({str(marker)!r}, 'w').write('ran')\n"
    for module in ("configuration_evil", "modeling_evil", "tokenization_evil"):
        (src / f"{module}.py").write_text(trap + "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n"
                                                "EvilConfig = EvilModel = EvilTokenizer\n")
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(architectures=["EvilForCausalLM"], auto_map={"AutoConfig": f"{src}--configuration_evil.EvilConfig",
                                                             "AutoModelForCausalLM": f"{src}--modeling_evil.EvilModel"})
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": [f"{src}--tokenization_evil.EvilTokenizer", None]}}))
    script = (f"from pipeline.sources.tokenizer import load_tokenizer\nfrom pipeline.sources import open_source\n"
              f"from jobs import quantize\n"
              f"print('quantize', quantize.main(['--model', {str(src)!r}, '--out', {str(tmp_path / 'out')!r}, "
              f"'--dry-run']))\n"
              f"try:\n    load_tokenizer(open_source({str(src)!r}))\nexcept ValueError as exc:\n    print('refused', exc)\n")
    proc = subprocess.run([sys.executable, "-c", script], input="y\ny\ny\n", capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env={**os.environ, "SINQ_AUTO_PATCH": "0"})
    assert not marker.exists(), proc.stdout + proc.stderr
    assert "quantize 0" in proc.stdout, proc.stdout + proc.stderr  # the model is transformers' own Llama
    assert f"refused {src}: its tokenizer needs the repository's own code (auto_map)" in proc.stdout, proc.stdout


# Verified means verified ------------------------------------------------------------------------

def _flip(path: Path, offset: int = -7) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_byte_is_refused_by_the_loader_and_redone_by_a_rerun(good: Path, done: Path, tmp_path: Path,
                                                                     capsys) -> None:
    out = tmp_path / "out"
    shutil.copytree(done, out)
    shard = out / "model-00001-of-00001.safetensors"
    original = shard.read_bytes()
    _flip(shard)
    with pytest.raises(IncompleteOutput, match=f"{shard} does not match its sha256 in the manifest"):
        load_quantized(str(out))
    load_quantized(str(out), check_hashes=False)  # the documented opt-out: sizes only

    lines: list[str] = []
    run_job(JobOptions.from_settings({"model": str(good), "out": str(out)}), log=lines.append, in_process=True)
    assert any("does not verify" in line for line in lines) and not any("nothing to do" in line for line in lines)
    assert shard.read_bytes() == original
    verify(Location(str(out)))


def test_a_same_size_config_edit_is_caught(done: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(done, out)
    text = (out / "config.json").read_text()
    assert '"silu"' in text
    (out / "config.json").write_text(text.replace('"silu"', '"gelu"'))
    with pytest.raises(IncompleteOutput, match="config.json does not match its sha256"):
        load_quantized(str(out))


def test_a_manifest_must_cover_every_file_the_index_names(done: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(done, out)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    manifest["files"] = [f for f in manifest["files"] if not f["name"].endswith(".safetensors")]
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(IncompleteOutput, match="model-00001-of-00001.safetensors is named in the index but not "
                                               "covered by the manifest"):
        verify(Location(str(out)))


def test_an_output_index_cannot_lead_the_loader_outside(done: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(done, out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: "../outside.safetensors" for k in index["weight_map"]}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="'../outside.safetensors' leads outside the checkpoint"):
        load_quantized(str(out), require_manifest=False)


# One job per destination -----------------------------------------------------------------------

def test_a_second_job_on_a_held_destination_is_refused_naming_the_holder(good: Path, tmp_path: Path,
                                                                        capsys) -> None:
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pipeline.io import locks\nfrom pipeline.io.storage import Location\n"
                               f"lock = locks.acquire(Location({str(out)!r}), 600)\nprint(lock.owner, flush=True)\n"
                               "time.sleep(600)\n"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "SINQ_AUTO_PATCH": "0"})
    try:
        owner = holder.stdout.readline().strip()
        err = assert_cli_refuses(good, out, capsys, f"{out} is being written by another job ({owner}, lock held until")
        assert "choose another --out" in err
    finally:
        holder.kill()
        holder.wait()
    # The holder died on this machine: its lock is taken over at once, not after its expiry.
    _job(good, out)
    verify(Location(str(out)))
    assert not (out / ".lock").exists()


def test_a_lock_kept_alive_outlasts_its_time_to_live(tmp_path: Path) -> None:
    from pipeline.io import locks

    where = Location(str(tmp_path / "out"))
    lock = locks.acquire(where, ttl_s=0.5)
    with locks.kept_alive(lock):
        time.sleep(1.5)  # three times its time to live, renewed every 0.1 s
        assert isinstance(locks.acquire(where, ttl_s=60), dict)
    time.sleep(0.7)  # no longer renewed: it expires, and another run takes it over
    taken = locks.acquire(where, ttl_s=60)
    assert isinstance(taken, locks.Lock) and taken.owner != lock.owner
    assert not lock.renew()
    taken.release()


def test_two_jobs_at_once_on_one_destination_leave_one_whole_output(good: Path, tmp_path: Path) -> None:
    other = write_llama_checkpoint(tmp_path / "other", layers=1, hidden=64, intermediate=128, vocab=64, shards=1,
                                   seed=3)
    out = tmp_path / "out"
    start = threading.Barrier(2)
    results: dict[str, object] = {}

    def job(name: str, src: Path) -> None:
        start.wait()
        try:
            results[name] = _job(src, out)
        except JobError as exc:
            results[name] = exc

    threads = [threading.Thread(target=job, args=(n, s)) for n, s in (("a", good), ("b", other))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refused = [r for r in results.values() if isinstance(r, JobError)]
    assert len(refused) == 1, results
    assert "is being written by another job" in str(refused[0]) or "complete output of another job" in str(refused[0])
    manifest = verify(Location(str(out)))
    winner = next(r for r in results.values() if isinstance(r, dict))
    assert manifest["run_key"] == winner["run_key"]


# Ties, as transformers decides them ---------------------------------------------------------------

def test_tied_config_with_a_distinct_head_stays_untied_as_in_transformers(good: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    src = _copy(good, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    theirs = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ours = load_source(str(src))
    ids = torch.arange(12)[None]
    assert theirs.lm_head.weight is not theirs.model.embed_tokens.weight
    assert ours.lm_head.weight is not ours.model.embed_tokens.weight
    assert torch.equal(ours(ids).logits, theirs(ids).logits)
    _job(src, tmp_path / "out")
    quantized = load_quantized(str(tmp_path / "out"))
    assert torch.equal(quantized.lm_head.weight, theirs.lm_head.weight)


# One line for a store's refusal ----------------------------------------------------------------

class _Forbidding(BaseHTTPRequestHandler):
    """An S3 endpoint that answers every request 403 AccessDenied."""

    protocol_version = "HTTP/1.1"
    BODY = b"<?xml version='1.0'?><Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"

    def log_message(self, *args) -> None:
        pass

    def _deny(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
        self.send_response(403)
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(self.BODY)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(self.BODY)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _deny


def test_a_store_refusal_names_the_operation_and_the_url(good: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Forbidding)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFORBIDDEN0000001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "forbidden/secret/value")
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert cli.main(["--model", "s3://models/m", "--out", str(tmp_path / "o"), "--endpoint-url", endpoint]) == 1
        err = capsys.readouterr().err.strip()
        assert err == "error: checking s3://models/m/config.json: Forbidden", err
        assert cli.main(["--model", str(good), "--out", "s3://outputs/m", "--endpoint-url", endpoint]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: cannot write to s3://outputs/m: creating s3://outputs/m/.lock-probe-") and \
            err.endswith("Access Denied"), err
        assert "forbidden/secret/value" not in err
    finally:
        server.shutdown()
