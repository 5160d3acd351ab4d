"""SINQ on a GPU: ours against the reference on Llama-70B shapes, then the whole pipeline on
synthetic://llama-70b with 1, 2 and 4 workers sharing the GPU.

First the milliseconds of each stage of the default setting per shape. Then per shape, for 4 and
3 bits with groups of 64 and 128 (1D, 8-bit scales): milliseconds for the Triton kernels, our torch
path and the reference (CUDA events, best of --repeats), the ratio to the reference, the memory-copy floor (one read and one write of the fp16 weight), the peak extra
GPU memory while quantizing an fp16 and a bf16 weight relative to the tensor's fp16 size, and the
share of codes that differ from the torch path. Then per decoder layer for 2D tiling, NF4, NF3
and the other bit widths. Then the job: wall time, source GB/s, and the GPU utilisation sampled
with nvidia-smi.

    python bench/gpu.py [--layers 8] [--repeats 3]
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
import triton

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("SINQ_AUTO_PATCH", "0")

from matrices import llm_like  # noqa: E402
from oracle import reference_quantize  # noqa: E402

from pipeline.sources.synthetic import decoder_matrices  # noqa: E402
from sinq_ops import QuantConfig, kernels, quantize  # noqa: E402
from sinq_ops.config import SINKHORN_ITERS  # noqa: E402
from sinq_ops.packing import unpack  # noqa: E402

MAIN = [QuantConfig(bits=b, group_size=g) for b in (4, 3) for g in (64, 128)]
OTHERS = [QuantConfig(bits=4, tiling="2D"), QuantConfig(bits=4, method="nf4"), QuantConfig(bits=3, method="nf3"),
          *(QuantConfig(bits=b) for b in (2, 5, 6, 8))]
LLAMA_70B = decoder_matrices("llama-70b")


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


def peak_ratio(w: torch.Tensor, cfg: QuantConfig) -> float:
    """Peak memory allocated while quantizing, beyond the weight itself, per byte of the fp16 weight."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    q = quantize(w, **cfg.to_dict())
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del q
    return peak / (w.numel() * 2)


def code_mismatch(w: torch.Tensor, cfg: QuantConfig) -> float:
    n, k = w.shape
    rows = n * k // cfg.group_size
    fast = unpack((q := quantize(w, **cfg.to_dict())).qweight, cfg.bits, rows)
    slow = unpack(quantize(w, **cfg.to_dict(), backend="torch").qweight, cfg.bits, rows)
    assert q.qweight.is_cuda
    return float((fast != slow).float().mean())


def layer_ms(cfg: QuantConfig, repeats: int, weights: dict) -> tuple[float, float]:
    ours = sum(cuda_ms(lambda w=w: quantize(w, **cfg.to_dict()), repeats) * count for w, count in weights.values())
    ref = sum(cuda_ms(lambda w=w: reference_quantize(w, cfg, "cuda"), repeats) * count for w, count in weights.values())
    return ours, ref


def stages(weights: dict, repeats: int) -> None:
    """Where the time of the default setting goes: value checks and kurtosis, Sinkhorn, quantize-and-pack."""
    cfg = QuantConfig()
    print(f"\nstages, {cfg.bits}-bit g{cfg.group_size} 1D (ms)")
    print(f"{'tensor':14s} {'stats':>7s} {'sinkhorn':>9s} {'pack':>7s} {'copy':>7s}")
    for name, (w, _) in weights.items():
        n = w.shape[0]
        r, c = kernels.sinkhorn_scales(w, n, cfg.group_size, SINKHORN_ITERS)
        times = (cuda_ms(lambda w=w: kernels.weight_stats(w), repeats),
                 cuda_ms(lambda w=w: kernels.sinkhorn_scales(w, n, cfg.group_size, SINKHORN_ITERS), repeats),
                 cuda_ms(lambda w=w: kernels.quantize_groups(w, r, c, n, cfg), repeats),
                 cuda_ms(lambda w=w: w.clone(), repeats))
        print(f"{name:14s} " + " ".join(f"{t:{width}.3f}" for t, width in zip(times, (7, 9, 7, 7))))


def shapes(repeats: int) -> None:
    weights = {name: (llm_like(n, k, seed=n + k).half().cuda(), count) for name, n, k, count in LLAMA_70B}
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    stages(weights, repeats)
    for cfg in MAIN:
        print(f"\n{cfg.method} {cfg.bits}-bit g{cfg.group_size} {cfg.tiling} {cfg.aux}")
        print(f"{'tensor':14s} {'shape':>12s} {'ours ms':>8s} {'torch ms':>9s} {'ref ms':>8s} {'ratio':>6s} "
              f"{'copy ms':>8s} {'peak fp16':>9s} {'peak bf16':>9s} {'codes !=':>9s}")
        totals = [0.0, 0.0, 0.0, 0.0]
        for name, (w, count) in weights.items():
            ours = cuda_ms(lambda w=w: quantize(w, **cfg.to_dict()), repeats)
            slow = cuda_ms(lambda w=w: quantize(w, **cfg.to_dict(), backend="torch"), repeats)
            ref = cuda_ms(lambda w=w: reference_quantize(w, cfg, "cuda"), repeats)
            copy = cuda_ms(lambda w=w: w.clone(), repeats)
            for i, v in enumerate((ours, slow, ref, copy)):
                totals[i] += v * count
            peak16 = peak_ratio(w, cfg)
            peak_bf = peak_ratio(w.bfloat16(), cfg)
            print(f"{name:14s} {f'{w.shape[0]}x{w.shape[1]}':>12s} {ours:8.2f} {slow:9.2f} {ref:8.2f} {ref / ours:6.1f} "
                  f"{copy:8.3f} {peak16:9.3f} {peak_bf:9.3f} {code_mismatch(w, cfg):9.2e}")
        ours, slow, ref, copy = totals
        print(f"{'decoder layer':14s} {'':>12s} {ours:8.2f} {slow:9.2f} {ref:8.2f} {ref / ours:6.1f} {copy:8.3f}")
    print(f"\nother settings, per decoder layer\n{'setting':24s} {'ours ms':>8s} {'ref ms':>8s} {'ratio':>6s}")
    for cfg in OTHERS:
        ours, ref = layer_ms(cfg, repeats, weights)
        print(f"{f'{cfg.method} {cfg.bits}-bit g{cfg.group_size} {cfg.tiling}':24s} {ours:8.2f} {ref:8.2f} {ref / ours:6.1f}")
    del weights
    torch.cuda.empty_cache()


def gpu_utilisation(stop: threading.Event, samples: list[float]) -> None:
    while not stop.wait(0.5):
        out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            samples.append(float(out.stdout.split()[0]))


def pipeline(layers: int, cfg: QuantConfig) -> None:
    import ray

    from pipeline.job.options import JobOptions
    from pipeline.job.run import run_job

    ray.init(address="local", include_dashboard=False, runtime_env={"env_vars": {"SINQ_AUTO_PATCH": "0"}})
    work = Path(tempfile.mkdtemp(prefix="sinq-gpu-"))
    print(f"\npipeline: synthetic://llama-70b?layers={layers} -> local disk")
    print(f"{'workers':>7s} {'cpus each':>9s} {'wall s':>7s} {'GB/s':>6s} {'GPU util %':>10s}")
    for workers in (1, 2, 4):
        samples: list[float] = []
        stop = threading.Event()
        sampler = threading.Thread(target=gpu_utilisation, args=(stop, samples), daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        # The workers share the machine's cores for generating the weights, as they would for reading them.
        cpus = max(1, ((os.cpu_count() or 2) - 1) // workers)
        manifest = run_job(JobOptions(model=f"synthetic://llama-70b?layers={layers}", out=str(work / f"w{workers}"),
                                      workers=workers, gpus_per_worker=1 / workers, cpus_per_worker=cpus,
                                      **cfg.to_dict()),
                           log=lambda _: None)
        wall = time.perf_counter() - t0
        stop.set()
        sampler.join()
        util = sum(samples) / len(samples) if samples else float("nan")
        print(f"{workers:>7d} {cpus:>9d} {wall:>7.1f} {manifest['totals']['source_bytes'] / 1e9 / wall:>6.2f} {util:>10.0f}")
    ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA device")
    shapes(args.repeats)
    pipeline(args.layers, QuantConfig())


if __name__ == "__main__":
    main()
