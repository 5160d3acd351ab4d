"""Perplexity of a source model and of its quantized output on the same token windows.

    python -m jobs.evaluate --model SRC --quantized OUT [--text FILE] [--ctx 2048] [--windows N]

Windows are non-overlapping, cut from the start of the text (default: WikiText-2 test, word
level, from $SINQ_EVAL_TEXT or ../shared/data/wikitext2_test.txt). Prints both perplexities,
their ratio and the time taken, and adds eval.json to the quantized output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from pipeline.evaluate import perplexity, report, text_windows
from pipeline.loader import load_quantized
from pipeline.manifest import IncompleteOutput
from pipeline.storage import Location

DEFAULT_TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext2_test.txt"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_text() -> str:
    return os.environ.get("SINQ_EVAL_TEXT", str(DEFAULT_TEXT))


def evaluate(model: str, quantized: str, *, text: str, ctx: int = 2048, windows: int | None = None,
             device: str = "cpu", dtype: torch.dtype = torch.float32, log=print) -> dict:
    """Evaluate both models on the same windows; writes eval.json into ``quantized``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    ids = text_windows(tokenizer, Path(text).read_text(), ctx, windows)
    log(f"evaluating on {ids.shape[0]} windows of {ctx} tokens from {text}")
    source_model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device).eval()
    src = perplexity(source_model, ids, device)
    del source_model
    log(f"source     ppl {src.ppl:.4f} ({src.seconds:.1f} s)")
    quant = perplexity(load_quantized(quantized, device=device, dtype=dtype), ids, device)
    log(f"quantized  ppl {quant.ppl:.4f} ({quant.seconds:.1f} s)")
    result = report(src, quant, text=text, ctx=ctx)
    log(f"ratio      {result['ppl_ratio']:.4f}")
    Location(quantized).write_bytes("eval.json", (json.dumps(result, indent=2) + "\n").encode())
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="source checkpoint (local directory or Hub repo id)")
    p.add_argument("--quantized", required=True, help="quantized output (local directory or s3://)")
    p.add_argument("--text", default=default_text(), help="evaluation text (default: $SINQ_EVAL_TEXT or WikiText-2 test)")
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--windows", type=int, help="evaluate only the first N windows (default: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    args = p.parse_args(argv)
    try:
        evaluate(args.model, args.quantized, text=args.text, ctx=args.ctx, windows=args.windows,
                 device=args.device, dtype=DTYPES[args.dtype])
    except (IncompleteOutput, ValueError, OSError) as exc:
        print(f"error: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
