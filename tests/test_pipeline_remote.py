"""Object storage and Hub sources: a real S3 endpoint (moto's server) on 127.0.0.1 and an
offline Hugging Face cache, with the job on a real local Ray instance."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import s3fs

from checkpoints import write_llama_checkpoint
from pipeline.output.manifest import MANIFEST_NAME, verify
from pipeline.job.options import JobOptions
from pipeline.job.run import run_job
from pipeline.sources import SourceError, open_source
from pipeline.io.storage import Location, StorageOptions
from pipeline_checks import assert_output_matches_source, file_bytes
from s3_server import FAKE_KEY_ID, FAKE_SECRET
from sinq_ops import QuantConfig


S3_BUCKETS = ("models", "quantized")
pytestmark = pytest.mark.usefixtures("ray_after_s3")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_llama_checkpoint(tmp_path_factory.mktemp("src") / "tiny-llama", layers=2, hidden=128,
                                  intermediate=256, vocab=256, shards=2, seed=2)


@pytest.fixture(scope="module")
def local_reference(checkpoint: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "out"
    run_job(JobOptions(model=str(checkpoint), out=str(out), workers=2, max_shard_size=150_000), log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def s3_checkpoint(s3, checkpoint: Path) -> str:
    s3.put(str(checkpoint) + "/", "models/tiny-llama/", recursive=True)
    return "s3://models/tiny-llama"


def _download(fs: s3fs.S3FileSystem, url: str, to: Path) -> Path:
    to.mkdir(parents=True)
    for key in fs.find(url.removeprefix("s3://")):
        (to / key.rsplit("/", 1)[-1]).write_bytes(fs.cat_file(key))
    return to


@pytest.mark.parametrize(("src_kind", "dst_kind"), [("local", "s3"), ("s3", "s3"), ("s3", "local")])
def test_s3_paths_give_the_same_bytes_as_local(
    src_kind: str, dst_kind: str, s3, checkpoint: Path, s3_checkpoint: str, local_reference: Path, tmp_path: Path,
) -> None:
    src = s3_checkpoint if src_kind == "s3" else str(checkpoint)
    dst = f"s3://quantized/{src_kind}-to-s3" if dst_kind == "s3" else str(tmp_path / "out")
    manifest = run_job(JobOptions(model=src, out=dst, workers=2, max_shard_size=150_000), log=lambda _: None)
    verify(Location(dst))
    got = _download(s3, dst, tmp_path / "got") if dst_kind == "s3" else Path(dst)
    assert file_bytes(got) == file_bytes(local_reference)
    assert not any(".staging" in k for k in s3.find("quantized"))
    if src_kind == "s3":
        etags = manifest["source"]["files"]
        assert set(etags) >= {"config.json", "model-00001-of-00002.safetensors"}
        assert all(isinstance(tag, str) and len(tag) >= 32 for tag in etags.values())
        assert FAKE_SECRET not in str(manifest) and FAKE_KEY_ID not in str(manifest)


def test_large_shards_go_up_as_multipart_uploads(s3, tmp_path: Path) -> None:
    src = write_llama_checkpoint(tmp_path / "wide", layers=1, hidden=512, intermediate=512, vocab=8192, shards=1, seed=3)
    part = 5 * 1024 * 1024
    run_job(JobOptions(model=str(src), out="s3://quantized/multipart", workers=1,
                       storage=StorageOptions(part_size=part, stream_assembly=True)), log=lambda _: None)
    local = tmp_path / "local"
    run_job(JobOptions(model=str(src), out=str(local), workers=1), log=lambda _: None)
    shard = "model-00001-of-00001.safetensors"
    assert (local / shard).stat().st_size > 3 * part
    etag = s3.info(f"quantized/multipart/{shard}")["ETag"].strip('"')
    assert "-" in etag and int(etag.rsplit("-", 1)[1]) >= 3  # S3 marks multipart ETags "<md5>-<parts>"
    assert s3.cat_file(f"quantized/multipart/{shard}") == (local / shard).read_bytes()


def test_s3_output_without_manifest_does_not_verify(s3, s3_checkpoint: str) -> None:
    dst = "s3://quantized/partial"
    run_job(JobOptions(model=s3_checkpoint, out=dst, workers=1), log=lambda _: None)
    s3.rm(f"quantized/partial/{MANIFEST_NAME}")
    with pytest.raises(ValueError, match="no manifest.json"):
        verify(Location(dst))


def _hub_cache(checkpoint: Path, repo: str, commit: str, ref: str = "main") -> None:
    from huggingface_hub import constants

    # Workers start with this environment; the driver must have read the same cache location.
    assert Path(constants.HF_HUB_CACHE) == Path(os.environ["HF_HOME"]) / "hub"
    org, name = repo.split("/")
    base = Path(constants.HF_HUB_CACHE) / f"models--{org}--{name}"
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / ref).write_text(commit)
    shutil.copytree(checkpoint, base / "snapshots" / commit, dirs_exist_ok=True)


def test_hub_repo_from_an_offline_cache(checkpoint: Path, local_reference: Path, tmp_path: Path) -> None:
    commit = "3f5b0c6e2d1a49a8b7c6d5e4f3a2b1c0d9e8f7a6"
    _hub_cache(checkpoint, "acme/tiny-llama", commit, ref="v1.0")
    out = tmp_path / "out"
    manifest = run_job(JobOptions(model="acme/tiny-llama@v1.0", out=str(out), workers=2, max_shard_size=150_000),
                       log=lambda _: None)
    assert manifest["source"]["repo_id"] == "acme/tiny-llama"
    assert manifest["source"]["commit"] == commit and manifest["source"]["revision"] == "v1.0"
    assert file_bytes(out) == file_bytes(local_reference)
    assert_output_matches_source(out, checkpoint, QuantConfig())


def test_hub_repo_missing_from_the_offline_cache_is_a_clear_error() -> None:
    with pytest.raises(SourceError, match="acme/absent@main: cannot resolve"):
        open_source("acme/absent@main")
