"""Object storage at network speed, on two real S3 servers (moto and SeaweedFS) on 127.0.0.1.

A throttling proxy (tests/throttle_proxy.py) in front of each store makes concurrency visible:
it counts requests in flight and the bytes each way, so a test can tell a read that went as
parallel ranges from one stream, and a shard the store assembled from one whose bytes were sent.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from pathlib import Path

import pytest

from checkpoints import llama_config, llama_tensors, write_checkpoint
from pipeline.io import locks
from pipeline.io.multipart import Extent, plan_parts
from pipeline.io.ranges import pieces, spans
from pipeline.io.storage import Location, StorageOptions
from pipeline.job.errors import JobError
from pipeline.job.options import JobOptions
from pipeline.job.run import run_job
from pipeline.output.manifest import MANIFEST_NAME, verify
from pipeline_checks import file_bytes
from seaweed_server import seaweed_server
from sinq_ops import QuantConfig
from throttle_proxy import ThrottleProxy

S3_BUCKETS = ("data",)
MiB = 1024 * 1024
pytestmark = pytest.mark.usefixtures("ray_after_stores")


@pytest.fixture(scope="module")
def seaweed():
    with seaweed_server("data") as fs:
        yield fs


@pytest.fixture(scope="module")
def ray_after_stores(s3, seaweed, local_ray):
    """Both stores up before Ray starts; every location below names its endpoint itself."""
    yield


@pytest.fixture(params=["moto", "seaweedfs"])
def store(request, s3, seaweed):
    """(endpoint, filesystem) of one of the two servers."""
    fs = s3 if request.param == "moto" else seaweed
    return _endpoint(fs), fs


def _endpoint(fs) -> str:
    return fs.endpoint_url


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    """A checkpoint whose layers quantize to more than S3's 5 MiB part minimum each."""
    cfg = llama_config(2, 1024, 4096, 1024)
    return write_checkpoint(tmp_path_factory.mktemp("wide") / "wide", cfg, llama_tensors(cfg, 5), 1)


def test_spans_join_close_ranges_and_pieces_cover_them() -> None:
    ranges = [(1000, 10), (0, 100), (150, 50), (5000, 0), (10_000, 30)]
    got = spans(ranges, max_gap=100)
    assert [(g.start, g.nbytes, sorted(g.members)) for g in got] == [(0, 200, [1, 2]), (1000, 10, [0]),
                                                                     (10_000, 30, [4])]
    cut = pieces(got[0], range_size=64)
    assert cut == [(0, 64), (64, 64), (128, 64), (192, 8)]


def test_parts_follow_s3_rules_and_hold_the_pieces_in_order() -> None:
    rng = random.Random(0)
    for _ in range(300):
        items = []
        for _ in range(rng.randint(1, 12)):
            if rng.random() < 0.3:
                items.append(bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 40))))
            else:
                start = rng.randint(0, 1000)
                items.append(Extent(f"b/k{rng.randint(0, 3)}", start, rng.randint(1, 700)))
        parts = plan_parts(items, min_part=100, max_part=300)
        assert all(p.nbytes >= 100 for p in parts[:-1]) and all(p.nbytes <= 300 for p in parts if p.copy)
        flat = []
        for p in parts:
            members = [p.copy] if p.copy else list(p.send)
            assert p.nbytes == sum(m.nbytes if isinstance(m, Extent) else len(m) for m in members)
            flat += members
        assert _bytes_of(flat) == _bytes_of(items)


def _bytes_of(items: list) -> list:
    """Pieces as a list of (kind, source, offset) per byte: equal lists mean equal content."""
    out = []
    for m in items:
        if isinstance(m, Extent):
            out += [("x", m.path, m.start + i) for i in range(m.nbytes)]
        else:
            out += [("b", b, None) for b in m]
    return out


def test_ranged_reads_are_in_flight_together(store) -> None:
    endpoint, fs = store
    blob = os.urandom(24 * MiB + 123)
    fs.pipe_file("data/reads/blob", blob)
    with ThrottleProxy(endpoint, rate=400e6, latency=0.05) as proxy:
        loc = Location("s3://data/reads", StorageOptions(endpoint_url=proxy.url, concurrency=8, range_size=MiB))
        whole, tail, small = loc.read_many([("blob", 0, len(blob)), ("blob", len(blob) - 50, 50), ("blob", 7, 9)])
        assert bytes(whole) == blob and bytes(tail) == blob[-50:] and bytes(small) == blob[7:16]
        assert proxy.peak_in_flight >= 8
        with pytest.raises(OSError, match=r"s3://data/reads/blob: short read at offset"):
            loc.read_range("blob", len(blob) - 10, 20)


def test_uploads_send_their_parts_in_parallel(store) -> None:
    endpoint, fs = store
    blob = os.urandom(22 * MiB)
    with ThrottleProxy(endpoint, rate=400e6, latency=0.2) as proxy:
        loc = Location("s3://data/up", StorageOptions(endpoint_url=proxy.url, part_size=5 * MiB, concurrency=4))
        with loc.open_write("blob") as f:
            for i in range(0, len(blob), 3 * MiB):
                f.write(blob[i:i + 3 * MiB])
        assert proxy.peak_in_flight >= 3
    assert fs.cat_file("data/up/blob") == blob
    assert fs.info("data/up/blob")["ETag"].strip('"').endswith("-5")


def test_a_failed_upload_leaves_no_object_and_no_open_upload(store) -> None:
    endpoint, fs = store
    loc = Location("s3://data/failed", StorageOptions(endpoint_url=endpoint, part_size=5 * MiB, concurrency=2))
    with pytest.raises(RuntimeError, match="stop here"):
        with loc.open_write("blob") as f:
            f.write(os.urandom(12 * MiB))
            raise RuntimeError("stop here")
    assert not fs.exists("data/failed/blob")
    uploads = fs.call_s3("list_multipart_uploads", Bucket="data", Prefix="failed/").get("Uploads", [])
    assert uploads == []


def test_compose_copies_extents_on_the_server(store) -> None:
    endpoint, fs = store
    a, b, c = os.urandom(12 * MiB), os.urandom(MiB), os.urandom(12 * MiB)
    for name, blob in (("a", a), ("b", b), ("c", c)):
        fs.pipe_file(f"data/compose/parts/{name}", blob)
    head = b"H" * 1000
    with ThrottleProxy(endpoint, rate=400e6, latency=0.0) as proxy:
        loc = Location("s3://data/compose", StorageOptions(endpoint_url=proxy.url))
        sent = loc.compose("out", [head, ("parts/a", 0, len(a)), ("parts/b", 0, len(b)), ("parts/c", 100, len(c) - 100)])
        uploaded = proxy.received["PUT"]
        whole, segments = loc.digests("out", [len(head), len(head) + len(a)])
    want = head + a + b + c[100:]
    assert fs.cat_file("data/compose/out") == want
    # The header and b go up topped up to two 5 MiB parts; the rest of a and of c are copied.
    assert sent == 10 * MiB and uploaded == sent
    assert whole == hashlib.sha256(want).hexdigest()
    assert segments == [hashlib.sha256(x).hexdigest() for x in (head, a, b + c[100:])]


def test_a_failed_compose_leaves_no_object_and_no_open_upload(store) -> None:
    endpoint, fs = store
    fs.pipe_file("data/broken/parts/a", os.urandom(12 * MiB))
    loc = Location("s3://data/broken", StorageOptions(endpoint_url=endpoint))
    with pytest.raises(OSError):
        loc.compose("out", [b"H" * 100, ("parts/a", 0, 12 * MiB), ("parts/missing", 0, 12 * MiB)])
    assert not fs.exists("data/broken/out")
    assert fs.call_s3("list_multipart_uploads", Bucket="data", Prefix="broken/").get("Uploads", []) == []


def test_local_compose_copies_in_the_kernel_and_streaming_gives_the_same_file(tmp_path: Path) -> None:
    blob = os.urandom(3 * MiB + 5)
    (tmp_path / "staged").write_bytes(blob)
    for copy in (True, False):
        loc = Location(str(tmp_path), StorageOptions(stream_assembly=not copy))
        sent = loc.compose(f"out-{copy}", [b"head", ("staged", 5, len(blob) - 5), b"tail"])
        assert (tmp_path / f"out-{copy}").read_bytes() == b"head" + blob[5:] + b"tail"
        assert sent == (8 if copy else len(blob) + 3)


def _lock_cycle(where: Location) -> None:
    first = locks.acquire(where, ttl_s=60)
    assert isinstance(first, locks.Lock)
    second = locks.acquire(where, ttl_s=60)
    assert isinstance(second, dict) and second["owner"] == first.owner
    assert not where.replace_if(locks.LOCK_NAME, None, '"0123456789abcdef0123456789abcdef"')  # wrong ETag: kept
    assert locks.read_lock(where)["owner"] == first.owner
    first.release()
    stale = locks.acquire(where, ttl_s=0.01)
    time.sleep(0.05)
    taken = locks.acquire(where, ttl_s=60)
    assert isinstance(stale, locks.Lock) and isinstance(taken, locks.Lock) and taken.owner != stale.owner
    stale.release()  # no longer its lock: the record it would remove has another ETag
    assert locks.read_lock(where)["owner"] == taken.owner
    taken.release()
    assert locks.read_lock(where) is None


def test_locks_are_exclusive_taken_over_and_released_by_etag(store) -> None:
    endpoint, _ = store
    _lock_cycle(Location(f"s3://data/locks/{endpoint.rsplit(':', 1)[1]}", StorageOptions(endpoint_url=endpoint)))


def test_local_locks_are_exclusive_taken_over_and_released_by_content(tmp_path: Path) -> None:
    _lock_cycle(Location(str(tmp_path / "out")))
    assert os.listdir(tmp_path / "out") == []  # no temporary file left beside the lock


def test_a_store_that_ignores_conditions_gets_no_lock(s3) -> None:
    with ThrottleProxy(_endpoint(s3), rate=1e9, latency=0.0, drop=("if-none-match", "if-match")) as proxy:
        where = Location("s3://data/locks/unconditional", StorageOptions(endpoint_url=proxy.url))
        with pytest.raises(locks.LockUnsupported, match=r"s3://data/locks/unconditional: locks cannot be "
                                                         r"exclusive on this store: it ignores If-None-Match"):
            locks.acquire(where, ttl_s=60)
    assert not s3.exists("data/locks/unconditional/.lock")


@pytest.fixture(scope="module")
def wide_local(wide: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wide-out") / "out"
    run_job(JobOptions(model=str(wide), out=str(out), workers=2, quant=QuantConfig(method="rtn")), log=lambda _: None)
    return out


@pytest.mark.parametrize("server", ["moto", "seaweedfs"])
def test_s3_job_assembles_shards_on_the_server(server: str, s3, seaweed, wide: Path, wide_local: Path,
                                               tmp_path: Path) -> None:
    fs = s3 if server == "moto" else seaweed
    fs.put(str(wide) + "/", f"data/src-{server}/", recursive=True)
    storage = StorageOptions(endpoint_url=_endpoint(fs))
    dst = f"s3://data/out-{server}"
    manifest = run_job(JobOptions(model=f"s3://data/src-{server}", out=dst, workers=2, storage=storage,
                                  quant=QuantConfig(method="rtn")), log=lambda _: None)
    verify(Location(dst, storage))
    got = tmp_path / "got"
    got.mkdir()
    for key in fs.find(dst.removeprefix("s3://")):
        (got / key.rsplit("/", 1)[-1]).write_bytes(fs.cat_file(key))
    assert file_bytes(got) == file_bytes(wide_local)
    shard = manifest["files"][[f["name"] for f in manifest["files"]].index("model-00001-of-00001.safetensors")]
    sent = manifest["timings"]["assembly_sent_bytes"]
    assert 0 < sent < 0.5 * shard["bytes"]  # the layers were copied by the store, not sent
    assert not any(".staging" in k for k in fs.find("data"))


def test_local_job_copies_staged_units_and_equals_streaming(wide: Path, wide_local: Path, tmp_path: Path) -> None:
    out = tmp_path / "streamed"
    manifest = run_job(JobOptions(model=str(wide), out=str(out), workers=1, quant=QuantConfig(method="rtn"),
                                  storage=StorageOptions(stream_assembly=True)), log=lambda _: None)
    assert file_bytes(out) == file_bytes(wide_local)
    local = verify(Location(str(wide_local)))
    assert manifest["timings"]["assembly_sent_bytes"] == manifest["totals"]["tensor_bytes"] + _headers(out)
    assert local["timings"]["assembly_sent_bytes"] == _headers(wide_local)


def _headers(out: Path) -> int:
    return sum(8 + int.from_bytes(p.read_bytes()[:8], "little") for p in out.glob("*.safetensors"))


def test_a_store_that_copies_wrong_ranges_fails_the_job_before_its_manifest(s3, wide: Path) -> None:
    s3.put(str(wide) + "/", "data/src-badcopy/", recursive=True)
    with ThrottleProxy(_endpoint(s3), rate=1e9, latency=0.0, drop=("x-amz-copy-source-range",)) as proxy:
        storage = StorageOptions(endpoint_url=proxy.url)
        with pytest.raises(JobError, match=r"s3://data/out-badcopy/model-00001-of-00001.safetensors: the store "
                                           r"assembled the shard's bytes of unit '.*' wrongly"):
            run_job(JobOptions(model="s3://data/src-badcopy", out="s3://data/out-badcopy", workers=2,
                               storage=storage, quant=QuantConfig(method="rtn")), log=lambda _: None)
    assert not s3.exists(f"data/out-badcopy/{MANIFEST_NAME}")
    assert not s3.exists("data/out-badcopy/model.safetensors.index.json")
