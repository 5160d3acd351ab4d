"""A-SINQ through the whole job against SINQ through the whole job and the reference's A-SINQ, on
SmolLM2-135M-Instruct: WikiText-2 test perplexity on the same windows, and wall time end to end.

Ours: ``jobs.quantize --method asinq`` on a local Ray (the calibration stage on
``../shared/data/wikitext2_valid.txt``, never the test split; the per-matrix search on the
workers), loaded with ``pipeline.loader.load_quantized``. SINQ: the same job with ``--method sinq``
on the same workers. The reference: its own functions in this process, as its A-SINQ runs per
layer: every decoder Linear's full input over its calibration size (13 sequences of 128 tokens)
recorded from the float model, then ``Quantizer.quantize(W, inputs, method="sinq_awq_l1_quantAux")``
per Linear (its public "asinq"); its SINQ timed the same way (``method="sinq_quantAux"``).

Times: one warm-up job first (the driver's imports, Ray's first workers), then each job ``--repeat``
times, SINQ and A-SINQ alternating, each method's best; all on the same Ray and workers.

    bash dev.sh bench asinq [--bits 3 4] [--windows 8] [--ctx 512] [--sequences 4] [--length 512] [--sample 512]
                            [--repeat 2] [--no-reference]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))  # after the project: bench/pipeline.py is no package
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("SINQ_AUTO_PATCH", "0")

from oracle import Quantizer  # noqa: E402
from quality import dense_model  # noqa: E402

from jobs.demo_model import smollm2_checkpoint  # noqa: E402
from jobs.evaluate import default_text  # noqa: E402
from pipeline.job.calibration.options import DEFAULT_TEXT  # noqa: E402
from pipeline.evaluate import perplexity, text_windows  # noqa: E402
from pipeline.job.options import JobOptions  # noqa: E402
from pipeline.job.run import run_job  # noqa: E402
from pipeline.loader import load_quantized  # noqa: E402


def linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


@torch.no_grad()
def reference_asinq(src: Path, calibration: torch.Tensor, bits: int) -> tuple[torch.nn.Module, float, float]:
    """The reference's A-SINQ applied to the float model, its seconds (inputs recorded, then every
    Linear quantized), and its SINQ's seconds on the same matrices."""
    model = dense_model(src)
    t0 = time.perf_counter()
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, []).append(a[0][0].float()))
             for n, m in linears(model).items()]
    for row in calibration:
        model(input_ids=row[None])
    for h in hooks:
        h.remove()
    record_s = time.perf_counter() - t0
    asinq_s = sinq_s = 0.0
    for name, m in linears(model).items():
        w = m.weight.data.to(torch.float16).float()
        # [sequences, tokens, in] as its pipeline hands them over: its compute_awq_scale averages |x| over
        # the first two dimensions, so a 2-D [tokens, in] input would make the scale one number.
        acts = torch.stack(inputs.pop(name))
        t0 = time.perf_counter()
        Quantizer.quantize(w, None, nbits=bits, group_size=64, axis=1, device="cpu", tiling_mode="1D",
                           method="sinq_quantAux", compute_dtype=torch.float32)
        sinq_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        packed, meta = Quantizer.quantize(w, acts, nbits=bits, group_size=64, axis=1, device="cpu", tiling_mode="1D",
                                          method="sinq_awq_l1_quantAux", compute_dtype=torch.float32)
        asinq_s += time.perf_counter() - t0
        meta["scale2"] = meta["scale2"].half()  # as its files hold it
        m.weight.data = Quantizer.dequantize(packed, meta).float().reshape(w.shape)
    return model, record_s + asinq_s, sinq_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--sequences", type=int, default=4)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--sample", type=int, default=512)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="jobs of each method and width, alternating; the best time")
    ap.add_argument("--no-reference", action="store_true", help="skip the reference's A-SINQ (about 15 minutes a "
                                                                   "bit width on 2 CPU cores)")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    src = smollm2_checkpoint(Path(os.environ.get("SINQ_CACHE", ROOT / ".cache")))
    tok = AutoTokenizer.from_pretrained(str(src), trust_remote_code=False)
    test = text_windows(tok, Path(default_text()).read_text(), args.ctx, args.windows)
    reference_calibration = text_windows(tok, DEFAULT_TEXT.read_text(), 128, 13)
    work = Path(tempfile.mkdtemp(prefix="sinq-asinq-"))
    ray.init(address="local", num_cpus=args.workers, include_dashboard=False,
             runtime_env={"env_vars": {"SINQ_AUTO_PATCH": "0"}})
    def job(method: str, bits: int, out: Path) -> float:
        settings = {"model": str(src), "out": str(out), "bits": bits, "group_size": 64, "method": method,
                    "workers": args.workers}
        if method == "asinq":
            settings.update(calibration=str(DEFAULT_TEXT), calibration_sequences=args.sequences,
                            calibration_length=args.length, calibration_sample=args.sample)
        t0 = time.perf_counter()
        run_job(JobOptions.from_settings(settings), log=lambda _: None)
        return time.perf_counter() - t0

    job("sinq", 4, work / "warm-up")  # the driver's imports and Ray's first workers, counted in neither
    rows = []
    for bits in args.bits:
        row = {"bits": bits}
        for method in ("sinq", "asinq"):
            row[f"{method}_s"] = float("inf")
        for r in range(args.repeat):  # alternating, each job's best: the other jobs' noise in neither
            for method in ("sinq", "asinq"):
                row[f"{method}_s"] = min(row[f"{method}_s"], job(method, bits, work / f"{method}-{bits}-{r}"))
        for method in ("sinq", "asinq"):
            row[method] = perplexity(load_quantized(str(work / f"{method}-{bits}-0")), test).ppl
            print(f"{bits}-bit {method}: {row[method]:.3f}, best of {args.repeat} jobs {row[f'{method}_s']:.1f} s",
                  flush=True)
        if args.no_reference:
            rows.append(row)
            continue
        model, row["ref_asinq_s"], row["ref_sinq_s"] = reference_asinq(src, reference_calibration, bits)
        row["ref_asinq"] = perplexity(model, test).ppl
        print(f"{bits}-bit reference asinq: {row['ref_asinq']:.3f} in {row['ref_asinq_s']:.1f} s "
              f"(its sinq {row['ref_sinq_s']:.1f} s)", flush=True)
        rows.append(row)
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)
    print(f"\nSmolLM2-135M-Instruct, WikiText-2 test, {test.shape[0]} windows x {args.ctx} tokens, group 64, 8-bit group "
          f"scales; ours calibrated on {args.sequences} x {args.length} tokens of wikitext2_valid ({args.sample} a "
          f"matrix's search), {args.workers} workers, job times the best of {args.repeat}; the reference on 13 x 128\n")
    print("| bits | SINQ (ours) | A-SINQ (ours) | A-SINQ (reference) | ours vs reference | "
          "time: SINQ job | A-SINQ job | ratio | reference A-SINQ | ours / reference |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "ref_asinq" not in r:
            print(f"| {r['bits']} | {r['sinq']:.3f} | {r['asinq']:.3f} | not run | | {r['sinq_s']:.1f} s | "
                  f"{r['asinq_s']:.1f} s | {r['asinq_s'] / r['sinq_s']:.2f}x | not run | |")
            continue
        print(f"| {r['bits']} | {r['sinq']:.3f} | {r['asinq']:.3f} | {r['ref_asinq']:.3f} | "
              f"{r['asinq'] / r['ref_asinq']:.4f}x | {r['sinq_s']:.1f} s | {r['asinq_s']:.1f} s | "
              f"{r['asinq_s'] / r['sinq_s']:.2f}x | {r['ref_asinq_s']:.1f} s ({r['ref_asinq_s'] / r['ref_sinq_s']:.1f}x "
              f"its SINQ) | {r['asinq_s'] / r['ref_asinq_s']:.2f}x |")


if __name__ == "__main__":
    main()
