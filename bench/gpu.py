"""SINQ on a GPU: ours against the reference on Llama-70B shapes, then the whole pipeline on
synthetic://llama-70b with 1, 2 and 4 workers sharing the GPU.

Per shape: milliseconds for ours and the reference (CUDA events, best of --repeats), the ratio,
the memory-copy floor (one read and one write of the fp16 weight), and the peak GPU memory while
quantizing relative to the tensor's fp16 size. Then the job: wall time, source GB/s, and the GPU
utilisation sampled with nvidia-smi.

    python bench/gpu.py [--layers 8] [--repeats 3] [--bits 4] [--group-size 64]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("SINQ_AUTO_PATCH", "0")

from matrices import llm_like  # noqa: E402
from oracle import reference_quantize  # noqa: E402

from sinq_ops import QuantConfig, quantize  # noqa: E402

LLAMA_70B = [("q/o_proj", 8192, 8192, 2), ("k/v_proj", 1024, 8192, 2),
             ("gate/up_proj", 28672, 8192, 2), ("down_proj", 8192, 28672, 1)]


def cuda_ms(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end))
    return best


def shapes(cfg: QuantConfig, repeats: int) -> None:
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}; {cfg.method} {cfg.bits}-bit g{cfg.group_size} "
          f"{cfg.tiling} {cfg.aux}")
    print(f"{'tensor':14s} {'shape':>12s} {'ours ms':>8s} {'ref ms':>8s} {'ratio':>6s} {'copy ms':>8s} {'peak/fp16':>9s}")
    total_ours = total_ref = 0.0
    for name, n, k, count in LLAMA_70B:
        w = llm_like(n, k, seed=n + k).half().cuda()
        ours = cuda_ms(lambda w=w: quantize(w, **cfg.to_dict()), repeats)
        ref = cuda_ms(lambda w=w: reference_quantize(w, cfg, "cuda"), repeats)
        copy = cuda_ms(lambda w=w: w.clone(), repeats)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        quantize(w, **cfg.to_dict())
        peak = torch.cuda.max_memory_allocated() - base
        total_ours += ours * count
        total_ref += ref * count
        print(f"{name:14s} {f'{n}x{k}':>12s} {ours:8.2f} {ref:8.2f} {ref / ours:6.1f} {copy:8.3f} "
              f"{peak / w.numel() / 2:9.2f}")
        del w
        torch.cuda.empty_cache()
    print(f"{'decoder layer':14s} {'':>12s} {total_ours:8.2f} {total_ref:8.2f} {total_ref / total_ours:6.1f}")


def gpu_utilisation(stop: threading.Event, samples: list[float]) -> None:
    while not stop.wait(0.5):
        out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            samples.append(float(out.stdout.split()[0]))


def pipeline(layers: int, cfg: QuantConfig) -> None:
    import ray

    from pipeline.run import JobOptions, run_job

    ray.init(address="local", include_dashboard=False, runtime_env={"env_vars": {"SINQ_AUTO_PATCH": "0"}})
    work = Path(tempfile.mkdtemp(prefix="sinq-gpu-"))
    print(f"\npipeline: synthetic://llama-70b?layers={layers} -> local disk")
    print(f"{'workers':>7s} {'wall s':>7s} {'GB/s':>6s} {'GPU util %':>10s}")
    for workers in (1, 2, 4):
        samples: list[float] = []
        stop = threading.Event()
        sampler = threading.Thread(target=gpu_utilisation, args=(stop, samples), daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        manifest = run_job(JobOptions(model=f"synthetic://llama-70b?layers={layers}", out=str(work / f"w{workers}"),
                                      workers=workers, gpus_per_worker=1 / workers, **cfg.to_dict()),
                           log=lambda _: None)
        wall = time.perf_counter() - t0
        stop.set()
        sampler.join()
        util = sum(samples) / len(samples) if samples else float("nan")
        print(f"{workers:>7d} {wall:>7.1f} {manifest['totals']['source_bytes'] / 1e9 / wall:>6.2f} {util:>10.0f}")
    ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--tiling", default="1D")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA device")
    cfg = QuantConfig(bits=args.bits, group_size=args.group_size, tiling=args.tiling)
    shapes(cfg, args.repeats)
    pipeline(args.layers, cfg)


if __name__ == "__main__":
    main()
