"""Perplexity of SmolLM2-135M on WikiText-2: fp16 vs RTN vs SINQ (ours, through the whole
pipeline and loader) vs the reference package's SINQ, on the same windows, at 4 and 3 bits
and group sizes 64 and 192. Prints a markdown table.

The model's published weights were themselves stored 4-bit with groups of 32 (GGUF Q4_1), so
4-bit group-32 quantization would be trivially exact. Groups of 64 and 192 are compared: most of
the model's Linear layers have 576 input features, which 128 does not divide (192 = 576 / 3 does).

    python bench/quality.py [--windows 24] [--ctx 2048]
    python bench/quality.py --asinq [ARGS]   A-SINQ's rows (bench/asinq.py: ours, our SINQ, the reference's A-SINQ)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.append(str(ROOT / "bench"))  # after the project: bench/pipeline.py is no package
os.environ.setdefault("SINQ_AUTO_PATCH", "0")

from oracle import reference_dequantize, reference_quantize  # noqa: E402

from jobs.evaluate import default_text  # noqa: E402
from jobs.demo_model import smollm2_checkpoint  # noqa: E402
from pipeline.evaluate import perplexity, text_windows  # noqa: E402
from pipeline.loader import load_quantized  # noqa: E402
from pipeline.job.options import JobOptions  # noqa: E402
from pipeline.job.run import run_job  # noqa: E402
from sinq_ops import QuantConfig  # noqa: E402


def dense_model(src: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32, trust_remote_code=False).eval()


def reference_sinq_model(src: Path, bits: int, group: int):
    """The source model with every decoder-layer Linear replaced by the reference's SINQ
    reconstruction (its public "sinq": 8-bit group scales and zeros)."""
    model = dense_model(src)
    cfg = QuantConfig(bits=bits, group_size=group)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            packed, meta = reference_quantize(module.weight.data, cfg)
            module.weight.data = reference_dequantize(packed, meta).reshape(module.weight.shape).float()
    return model


def main() -> None:
    if "--asinq" in sys.argv:
        import asinq

        sys.argv.remove("--asinq")
        asinq.main()
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=24)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--text", default=default_text())
    args = ap.parse_args()

    from transformers import AutoTokenizer

    src = smollm2_checkpoint(Path(os.environ.get("SINQ_CACHE", ROOT / ".cache")))
    ids = text_windows(AutoTokenizer.from_pretrained(str(src), trust_remote_code=False), Path(args.text).read_text(), args.ctx, args.windows)
    work = Path(tempfile.mkdtemp(prefix="sinq-quality-"))
    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"SINQ_AUTO_PATCH": "0"}})
    t0 = time.perf_counter()
    base = perplexity(dense_model(src), ids).ppl
    print(f"fp16: {base:.3f}", flush=True)
    rows = []
    for bits in (4, 3):
        for group in (64, 192):
            ppl = {}
            for method in ("rtn", "sinq"):
                out = work / f"{method}-{bits}-{group}"
                run_job(JobOptions(model=str(src), out=str(out), quant=QuantConfig(bits=bits, group_size=group, method=method), workers=2),
                        log=lambda _: None)
                ppl[method] = perplexity(load_quantized(str(out)), ids).ppl
            ppl["ref"] = perplexity(reference_sinq_model(src, bits, group), ids).ppl
            rows.append((bits, group, ppl))
            print(f"{bits}-bit g{group}: {ppl}", flush=True)
    ray.shutdown()

    print(f"\nSmolLM2-135M-Instruct, WikiText-2 test (word level), {ids.shape[0]} windows x {args.ctx} tokens, "
          f"fp32 compute on CPU, {time.perf_counter() - t0:.0f} s\n")
    print("| bits | group | fp16 | RTN | SINQ (ours) | SINQ (reference) | ours vs reference |")
    print("|---|---|---|---|---|---|---|")
    for bits, group, ppl in rows:
        print(f"| {bits} | {group} | {base:.3f} | {ppl['rtn']:.3f} | {ppl['sinq']:.3f} | {ppl['ref']:.3f} | "
              f"{100 * (ppl['sinq'] / ppl['ref'] - 1):+.2f}% |")


if __name__ == "__main__":
    main()
