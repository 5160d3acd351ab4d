"""Object storage at network speed: raw floors and the s3 -> s3 job through a throttled store.

A real SeaweedFS (`weed mini`) on 127.0.0.1 sits behind tests/throttle_proxy.py, run in its own
process, which caps each connection at --rate bytes/s and adds --latency before each response,
as a remote store does. In one run this prints:

- the raw floors through the proxy: one GET stream, concurrent ranged GETs, one upload stream,
  a parallel multipart upload, and a server-side copy (UploadPartCopy) of the same bytes;
- the s3 -> s3 job (bf16 Llama, --method rtn, 2 workers) before (one stream per transfer, every
  shard byte sent by the reducer: concurrency 1, stream_assembly on) and after (the defaults):
  wall time, GB/s, time per stage, and the share of output bytes the reducer sent;
- the goals, and the paper model for Llama-70B on 8 nodes recomputed from the measured ratios.

    python bench/s3.py [--layers 8] [--hidden 2048] [--rate 20e6] [--latency 0.02] [--max-shard-size BYTES]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the project, and the tests' store, proxy and checkpoint helpers
os.environ.setdefault("SINQ_AUTO_PATCH", "0")

from checkpoints import write_llama_checkpoint  # noqa: E402
from seaweed_server import seaweed_server  # noqa: E402

MB = 1e6
MiB = 2**20
# The paper model's assumptions, named once: a 70B bf16 checkpoint, its 4-bit output, 8 nodes with
# 10 GbE, AWS S3's rate per connection, and the kernels' compute for the whole model.
PAPER = {"in_gb": 141.0, "out_gb": 41.0, "nodes": 8, "nic_gbps": 1.25, "conn_mbps": 90.0, "compute_s": 2.0,
         "shard_gb": 4.0}


def serve_proxy(upstream: str, rate: float, latency: float) -> None:
    """Child process: run the proxy and print its URL; keeps the proxy's GIL apart from the job's."""
    from throttle_proxy import ThrottleProxy

    with ThrottleProxy(upstream, rate=rate, latency=latency) as proxy:
        print(proxy.url, flush=True)
        sys.stdin.read()  # until the parent closes the pipe


def start_proxy(upstream: str, rate: float, latency: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, __file__, "--serve-proxy", upstream, str(rate), str(latency)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def floors(proxy_url: str, size: int) -> dict[str, float]:
    """MB/s of each raw transfer of ``size`` bytes through the proxy."""
    from pipeline.io.storage import Location, StorageOptions

    blob = os.urandom(size)
    one = StorageOptions(endpoint_url=proxy_url, concurrency=1, part_size=size)
    many = StorageOptions(endpoint_url=proxy_url)
    Location("s3://bench/floor", many).write_bytes("blob", blob)
    out = {}
    out["single GET"] = size / timed(lambda: Location("s3://bench/floor", one).read_range("blob", 0, size)) / MB
    out["concurrent ranged GETs"] = size / timed(
        lambda: Location("s3://bench/floor", many).read_range("blob", 0, size)) / MB
    out["single upload stream"] = size / timed(lambda: Location("s3://bench/floor", one).write_bytes("one", blob)) / MB
    out["parallel multipart upload"] = size / timed(
        lambda: Location("s3://bench/floor", many).write_bytes("many", blob)) / MB
    out["server-side copy"] = size / timed(
        lambda: Location("s3://bench/floor", many).compose("copy", [("blob", 0, size)])) / MB
    return out


def run(src: str, dst: str, storage, workers: int, max_shard_size: int) -> tuple[dict, float]:
    from pipeline.job.options import JobOptions
    from pipeline.job.run import run_job
    from sinq_ops import QuantConfig

    t0 = time.perf_counter()
    manifest = run_job(JobOptions(model=src, out=dst, workers=workers, storage=storage, overwrite=True,
                                  max_shard_size=max_shard_size, quant=QuantConfig(method="rtn")), log=lambda _: None)
    return manifest, time.perf_counter() - t0


def paper_model(f: dict[str, float], fixed_s: float) -> list[str]:
    """Llama-70B, 8 nodes, S3 to S3, from the measured speed-ups of concurrency over one connection."""
    p = PAPER
    read_x = f["concurrent ranged GETs"] / f["single GET"]
    up_x = f["parallel multipart upload"] / f["single upload stream"]
    node_read = min(p["nic_gbps"], p["conn_mbps"] * read_x / 1000)
    node_up = min(p["nic_gbps"], p["conn_mbps"] * up_x / 1000)
    read_s = p["in_gb"] / p["nodes"] / node_read
    stage_s = p["out_gb"] / p["nodes"] / node_up
    per_node = max(read_s, stage_s + p["compute_s"] / p["nodes"])  # reads overlap the quantize-and-stage of the unit before
    check_s = p["out_gb"] / node_read  # the reducer reads every shard back once to check and hash it
    tail_s = p["shard_gb"] / node_read  # the last shard's check, after the last unit
    total = fixed_s + max(per_node, check_s) + tail_s
    return [
        f"  per-node read   {node_read:.2f} GB/s (90 MB/s x {read_x:.1f} measured, capped at {p['nic_gbps']} GB/s 10 GbE)",
        f"  per-node upload {node_up:.2f} GB/s (90 MB/s x {up_x:.1f} measured, same cap)",
        f"  worker reads {read_s:.1f} s, staging {stage_s:.1f} s, compute {p['compute_s']:.1f} s in all; per node {per_node:.1f} s",
        f"  reducer: sends ~{5 * MiB * p['out_gb'] / p['shard_gb'] / 1e9:.2f} GB (5 MiB top-up per shard), "
        f"reads {p['out_gb']:.0f} GB back to check: {check_s:.1f} s, overlapped; last shard {tail_s:.1f} s after the last unit",
        f"  fixed cost {fixed_s:.1f} s (measured here)",
        f"  total ~{total:.0f} s (goal: under 120 s)",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--rate", type=float, default=20e6, help="bytes/s per connection")
    ap.add_argument("--latency", type=float, default=0.02, help="seconds before each response")
    ap.add_argument("--floor-mb", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    # The job's default: this output is one shard, so its whole assembly follows the last unit (a
    # 70B output is ten, assembled as their units finish). Each shard costs the reducer a 5 MiB part.
    ap.add_argument("--max-shard-size", type=int, default=4 * 10**9)
    args = ap.parse_args()

    import ray

    from pipeline.io.storage import StorageOptions

    work = Path(tempfile.mkdtemp(prefix="sinq-bench-s3-"))
    with seaweed_server("bench") as fs:
        upstream = fs.endpoint_url
        proxy, proxy_url = start_proxy(upstream, args.rate, args.latency)
        try:
            src = write_llama_checkpoint(work / "src", layers=args.layers, hidden=args.hidden,
                                         intermediate=args.intermediate, vocab=32000, shards=2)
            fs.put(str(src) + "/", "bench/src/", recursive=True)
            print(f"SeaweedFS behind a proxy: {args.rate / MB:.0f} MB/s per connection, {args.latency * 1000:.0f} ms "
                  "before each response\n\nraw floors ({} MB):".format(args.floor_mb))
            f = floors(proxy_url, args.floor_mb * 1_000_000)
            for name, mbps in f.items():
                print(f"  {name:28s} {mbps:8.1f} MB/s")
            ray.init(address="local", num_cpus=args.workers, include_dashboard=False,
                     runtime_env={"env_vars": {"SINQ_AUTO_PATCH": "0"}})
            before = StorageOptions(endpoint_url=proxy_url, concurrency=1, stream_assembly=True, part_size=64 * MiB)
            after = StorageOptions(endpoint_url=proxy_url)
            rows = {}
            for label, storage in (("before", before), ("after", after)):
                rows[label] = run("s3://bench/src", f"s3://bench/out-{label}", storage, args.workers,
                                  args.max_shard_size)
            _, local_wall = run(str(src), str(work / "local-out"), StorageOptions(), args.workers, args.max_shard_size)
            tiny = write_llama_checkpoint(work / "tiny", layers=1, hidden=64, intermediate=128, vocab=128, shards=1)
            _, tiny_wall = run(str(tiny), str(work / "tiny-out"), StorageOptions(), args.workers, args.max_shard_size)
        finally:
            proxy.stdin.close()
            proxy.wait()
            ray.shutdown()

    in_gb = rows["after"][0]["totals"]["source_bytes"] / 1e9
    print(f"\ns3 -> s3 job: {in_gb:.2f} GB bf16 in, {args.layers} layers, rtn 4-bit, {args.workers} workers, "
          f"{rows['after'][0]['totals']['shards']} shards")
    print(f"{'':8s} {'wall s':>7} {'GB/s':>6} {'read s':>7} {'read MB/s':>9} {'quant s':>7} {'stage s':>7} "
          f"{'assembly s':>10} {'sent by reducer':>16}")
    for label, (m, wall) in rows.items():
        t = m["timings"]
        read_rate = m["totals"]["source_bytes"] / (t["read_s"] / args.workers) / MB
        sent = t["assembly_sent_bytes"] / m["totals"]["output_bytes"]
        print(f"{label:8s} {wall:>7.1f} {in_gb / wall:>6.3f} {t['read_s']:>7.1f} {read_rate:>9.1f} {t['quantize_s']:>7.1f} "
              f"{t['stage_write_s']:>7.1f} {t['assembly_s']:>10.1f} {100 * sent:>15.2f}%")
    m, wall = rows["after"]
    t = m["timings"]
    read_rate = m["totals"]["source_bytes"] / (t["read_s"] / args.workers) / MB
    out_b, in_b = m["totals"]["output_bytes"], m["totals"]["source_bytes"]
    floor_s = in_b / (f["concurrent ranged GETs"] * MB) + out_b / (f["parallel multipart upload"] * MB) + \
        out_b / (f["server-side copy"] * MB) + out_b / (f["concurrent ranged GETs"] * MB)
    print(f"\nspeed-up, after vs before: {rows['before'][1] / wall:.2f}x")
    print(f"source read rate per worker vs one connection: {read_rate / f['single GET']:.1f}x (goal: 8x or more)")
    print(f"reducer sent {100 * t['assembly_sent_bytes'] / out_b:.2f}% of the output bytes (goal: under 2%)")
    print(f"raw floors allow {floor_s:.1f} s (read in, upload out, copy out, read out back, one after another, "
          f"one client): the job reaches {100 * floor_s / wall:.0f}% of that (goal: 70%)")
    print(f"the same job local disk -> local disk: {local_wall:.1f} s (no network: its compute and fixed cost)")
    print(f"a 1-layer job on local disk, Ray already up: {tiny_wall:.1f} s (the fixed cost)")
    print("\npaper model, Llama-70B on 8 nodes, S3 to S3:")
    print("\n".join(paper_model(f, tiny_wall)))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--serve-proxy":
        serve_proxy(sys.argv[2], float(sys.argv[3]), float(sys.argv[4]))
    else:
        main()
