"""SmolLM2-135M-Instruct written as compressed-tensors and served by vLLM's CPU build: WikiText-2
perplexity through the engine beside the reference package's SINQ, and serving speed and memory
beside the float16 source on the same engine and prompts.

Perplexity rows, all on the same windows: the float16 source; the reference's SINQ (per-matrix
column scales, its own quantize and dequantize, 8-bit group scales as its public "sinq" stores
them); our SINQ layout through ``load_quantized``; our compressed-tensors output through
``load_quantized`` and through vLLM (its own prompt log-probabilities); RTN written and served the
same way. vLLM's CPU kernel runs asymmetric weights at 4 bits only, so the 8-bit output is measured
through ``load_quantized`` (on GPUs it is served by Machete).

    bash dev.sh bench serving [--windows 24] [--ctx 2048] [--prompts 8] [--new-tokens 128] [--engine-dtype float32]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("SINQ_AUTO_PATCH", "0")

from quality import dense_model, reference_sinq_model  # noqa: E402
from vllm_server import Server, vllm_server  # noqa: E402

from jobs.demo_model import smollm2_checkpoint  # noqa: E402
from jobs.evaluate import default_text  # noqa: E402
from pipeline.engine import Engine, engine_perplexity  # noqa: E402
from pipeline.evaluate import perplexity, text_windows  # noqa: E402
from pipeline.job.options import JobOptions  # noqa: E402
from pipeline.job.run import run_job  # noqa: E402
from pipeline.loader import load_quantized  # noqa: E402
from sinq_ops import QuantConfig  # noqa: E402


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=1800) as r:
        return json.loads(r.read())


def speed(server: Server, prompts: list[list[int]], new_tokens: int) -> dict:
    """Generated tokens per second for one stream and for all prompts at once, and the server's memory."""
    model = Engine(server.url).served_model()
    body = {"model": model, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True}
    _post(f"{server.url}/v1/completions", {**body, "prompt": prompts[0], "max_tokens": 4})  # warm up
    t0 = time.perf_counter()
    one = _post(f"{server.url}/v1/completions", {**body, "prompt": prompts[0]})
    single = one["usage"]["completion_tokens"] / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        replies = list(pool.map(lambda p: _post(f"{server.url}/v1/completions", {**body, "prompt": p}), prompts))
    batch = sum(r["usage"]["completion_tokens"] for r in replies) / (time.perf_counter() - t0)
    return {"single_tok_s": single, "batch_tok_s": batch, "rss_gb": server.rss_bytes() / 1e9,
            "kernel": server.int4_kernel()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=24)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--text", default=default_text())
    ap.add_argument("--engine-dtype", default="float32", choices=("float32", "float16"),
                    help="vLLM's dtype: a CPU without native float16 arithmetic (AVX2 only) runs float16 emulated, "
                         "several times slower than float32 (default: %(default)s)")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    src = smollm2_checkpoint(Path(os.environ.get("SINQ_CACHE", ROOT / ".cache")))
    text = Path(args.text).read_text()
    ids = text_windows(AutoTokenizer.from_pretrained(str(src), trust_remote_code=False), text, args.ctx, args.windows)
    prompts = [w[:128].tolist() for w in ids[: args.prompts]]
    work = Path(tempfile.mkdtemp(prefix="sinq-serving-"))
    t_start = time.perf_counter()
    ppl: dict[str, float] = {"fp16 source": perplexity(dense_model(src), ids).ppl}
    print(f"fp16 source {ppl['fp16 source']:.3f}", flush=True)
    for bits in (4, 8):
        ppl[f"{bits}-bit SINQ, reference"] = perplexity(reference_sinq_model(src, bits, 64), ids).ppl
        out = work / f"sinq-{bits}"
        run_job(JobOptions(model=str(src), out=str(out), quant=QuantConfig(bits=bits, group_size=64)), in_process=True,
                log=lambda _: None)
        ppl[f"{bits}-bit SINQ layout, load_quantized"] = perplexity(load_quantized(str(out)), ids).ppl
        print({k: round(v, 3) for k, v in ppl.items()}, flush=True)

    speeds: dict[str, dict] = {}
    timings: dict[str, float] = {}
    for bits, method in ((4, "sinq"), (4, "rtn"), (8, "sinq")):
        out = work / f"ct-{method}-{bits}"
        t0 = time.perf_counter()
        run_job(JobOptions(model=str(src), out=str(out), quant=QuantConfig(bits=bits, group_size=64, method=method),
                           output_format="compressed-tensors"), in_process=True, log=lambda _: None)
        timings[f"{method} {bits}-bit compressed-tensors"] = time.perf_counter() - t0
        label = f"{bits}-bit {method.upper()} compressed-tensors"
        ppl[f"{label}, load_quantized"] = perplexity(load_quantized(str(out)), ids).ppl
        if bits == 4:
            with vllm_server(out, work / f"vllm-{method}.log", max_model_len=args.ctx + 8,
                             kv_cache_bytes=512 << 20, dtype=args.engine_dtype) as server:
                ppl[f"{label}, served by vLLM CPU"] = engine_perplexity(Engine(server.url), ids).ppl
                if method == "sinq":
                    speeds[label] = speed(server, prompts, args.new_tokens)
        print({k: round(v, 3) for k, v in ppl.items()}, flush=True)
    with vllm_server(src, work / "vllm-source.log", max_model_len=args.ctx + 8, kv_cache_bytes=512 << 20, dtype=args.engine_dtype) as server:
        ppl["fp16 source, served by vLLM CPU"] = engine_perplexity(Engine(server.url), ids).ppl
        speeds["fp16 source"] = speed(server, prompts, args.new_tokens)

    print(f"\nSmolLM2-135M-Instruct, WikiText-2 test (word level), {ids.shape[0]} windows x {args.ctx} tokens, group 64, "
          f"{time.perf_counter() - t_start:.0f} s in all\n")
    print("| model | perplexity | vs reference SINQ (same bits) |")
    print("|---|---|---|")
    for name, value in ppl.items():
        bits = name.split("-bit")[0]
        ref = ppl.get(f"{bits}-bit SINQ, reference")
        print(f"| {name} | {value:.3f} | {f'{value / ref:.4f}x' if ref and 'reference' not in name else ''} |")
    print(f"\nServing on vLLM CPU ({args.engine_dtype}, {len(prompts)} prompts of 128 tokens, {args.new_tokens} new tokens each):\n")
    print("| model | tokens/s, one stream | tokens/s, all prompts at once | server memory (RSS) | int4 product |")
    print("|---|---|---|---|---|")
    for name, s in speeds.items():
        kernel = s["kernel"] if "compressed" in name else "-"
        print(f"| {name} | {s['single_tok_s']:.1f} | {s['batch_tok_s']:.1f} | {s['rss_gb']:.2f} GB | {kernel} |")
    print("\n" + ", ".join(f"{k}: {v:.1f} s" for k, v in timings.items()))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    main()
