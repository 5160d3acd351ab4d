"""A-SINQ's activation-scale search (``sinq_ops.activation``) on SmolLM2-135M-Instruct, in one process:
what its settings buy before any of it runs on the cluster.

The float model's inputs to every decoder-layer Linear are recorded on calibration text
(``../shared/data/wikitext2_valid.txt``, never the test split): their per-channel mean |x| over all
tokens, and a fixed sample of tokens for the search's error. Every Linear is then quantized with the
scale the search picks, and WikiText-2 test perplexity measured on the same windows as plain SINQ.
Rows: plain SINQ; the reference's candidates on its own calibration size (13 sequences of 128
tokens); the same with plain SINQ as a candidate; and with plain SINQ as a candidate on more text.

    bash dev.sh bench asinq_search [--bits 3 4] [--windows 8] [--ctx 512] [--sequences 64] [--length 512]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("SINQ_AUTO_PATCH", "0")

from quality import dense_model  # noqa: E402

from jobs.demo_model import smollm2_checkpoint  # noqa: E402
from jobs.evaluate import default_text  # noqa: E402
from pipeline.evaluate import perplexity, text_windows  # noqa: E402
from sinq_ops import QuantConfig, quantize  # noqa: E402
from sinq_ops.activation import search  # noqa: E402

CALIBRATION = ROOT.parent / "shared" / "data" / "wikitext2_valid.txt"


def linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


@torch.no_grad()
def calibrate(model: torch.nn.Module, ids: torch.Tensor, sample_tokens: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per Linear: mean |x| per input channel over every token of ``ids``, and ``sample_tokens`` of
    its inputs (the same positions for every Linear), from the float model."""
    n, length = ids.shape
    g = torch.Generator().manual_seed(0)
    picks = [torch.randperm(length, generator=g)[: max(1, sample_tokens // n)] for _ in range(n)]
    sums: dict[str, torch.Tensor] = {}
    samples: dict[str, list[torch.Tensor]] = {}
    current = [0]

    def record(name: str):
        def hook(_module, inputs, _output):
            x = inputs[0][0].float()
            sums[name] = sums.get(name, 0) + x.abs().sum(0, dtype=torch.float64)
            samples.setdefault(name, []).append(x[picks[current[0]]])
        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in linears(model).items()]
    try:
        for i, window in enumerate(ids):
            current[0] = i
            model(input_ids=window[None])
    finally:
        for h in hooks:
            h.remove()
    return {name: ((sums[name] / ids.numel()).float(), torch.cat(samples[name])) for name in sums}


def quantized_model(src: Path, config: QuantConfig, stats: dict | None, **search_args) -> tuple[torch.nn.Module, float]:
    model = dense_model(src)
    t0 = time.perf_counter()
    with torch.no_grad():
        for name, m in linears(model).items():
            scale = None
            if stats is not None:
                mean, sample = stats[name]
                scale = search(m.weight, sample, config, x_abs_mean=mean, **search_args)
            m.weight.data = quantize(m.weight, **config.to_dict(), backend="torch", activation_scale=scale).dequantize()
    return model, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--sample", type=int, default=2048, help="tokens the search measures its error on")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    src = smollm2_checkpoint(Path(os.environ.get("SINQ_CACHE", ROOT / ".cache")))
    tok = AutoTokenizer.from_pretrained(str(src), trust_remote_code=False)
    test = text_windows(tok, Path(default_text()).read_text(), args.ctx, args.windows)
    valid = CALIBRATION.read_text()
    base = dense_model(src)
    t0 = time.perf_counter()
    small = calibrate(base, text_windows(tok, valid, 128, 13), 13 * 128)
    small_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    large = calibrate(base, text_windows(tok, valid, args.length, args.sequences), args.sample)
    large_s = time.perf_counter() - t0
    rows = []
    for bits in args.bits:
        config = QuantConfig(bits=bits, group_size=64, aux="fp16")
        for label, stats, kw in (
            ("SINQ", None, {}),
            ("A-SINQ, the reference's candidates, 13 x 128 tokens", small, {"keep_sinq": False}),
            ("A-SINQ, SINQ among the candidates, 13 x 128 tokens", small, {}),
            (f"A-SINQ, SINQ among the candidates, {args.sequences} x {args.length} tokens ({args.sample} sampled)",
             large, {}),
        ):
            model, seconds = quantized_model(src, config, stats, **kw)
            ppl = perplexity(model, test).ppl
            rows.append((bits, label, ppl, seconds))
            print(f"{bits}-bit {label}: {ppl:.3f} ({seconds:.0f} s)", flush=True)
    print(f"\nSmolLM2-135M-Instruct, WikiText-2 test, {test.shape[0]} windows x {args.ctx} tokens, group 64; calibration "
          f"on wikitext2_valid: 13 x 128 tokens recorded in {small_s:.0f} s, {args.sequences} x {args.length} in "
          f"{large_s:.0f} s\n")
    print("| bits | quantization | perplexity | vs SINQ | quantize s |")
    print("|---|---|---|---|---|")
    for bits, label, ppl, seconds in rows:
        sinq = next(p for b, lab, p, _ in rows if b == bits and lab == "SINQ")
        print(f"| {bits} | {label} | {ppl:.3f} | {ppl / sinq:.4f}x | {seconds:.0f} |")


if __name__ == "__main__":
    main()
