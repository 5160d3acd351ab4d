"""Perplexity of a source model and of its quantized output on the same token windows.

    sinq-evaluate --model SRC --quantized OUT [--text FILE] [--ctx 2048] [--windows N]
    python -m jobs.evaluate ...          (the same)

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

from jobs import cli
from pipeline.io.storage import Location, StorageOptions

DEFAULT_TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext2_test.txt"
DTYPES = ("float32", "bfloat16", "float16")


def default_text() -> str:
    return os.environ.get("SINQ_EVAL_TEXT", str(DEFAULT_TEXT))


def evaluate(model: str, quantized: str, *, text: str, ctx: int = 2048, windows: int | None = None,
             device: str = "cpu", dtype: "torch.dtype | None" = None, storage: StorageOptions | None = None,
             log=print) -> dict:
    """Evaluate both models on the same windows; writes eval.json into ``quantized``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.evaluate import check_evaluable, perplexity, report, text_windows
    from pipeline.loader import load_quantized

    check_evaluable(model)
    dtype = dtype or torch.float32
    storage = storage or StorageOptions()

    tokenizer = AutoTokenizer.from_pretrained(model)
    ids = text_windows(tokenizer, Path(text).read_text(), ctx, windows)
    log(f"evaluating on {ids.shape[0]} windows of {ctx} tokens from {text}")
    source_model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device).eval()
    src = perplexity(source_model, ids, device)
    del source_model
    log(f"source     ppl {src.ppl:.4f} ({src.seconds:.1f} s)")
    quant = perplexity(load_quantized(quantized, device=device, dtype=dtype, storage=storage), ids, device)
    log(f"quantized  ppl {quant.ppl:.4f} ({quant.seconds:.1f} s)")
    result = report(src, quant, text=text, ctx=ctx)
    log(f"ratio      {result['ppl_ratio']:.4f}")
    Location(quantized, storage).write_bytes("eval.json", (json.dumps(result, indent=2) + "\n").encode())
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sinq-evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="source checkpoint (local directory or Hub repo id)")
    p.add_argument("--quantized", required=True, help="quantized output (local directory or s3://)")
    p.add_argument("--text", default=default_text(), help="evaluation text (default: $SINQ_EVAL_TEXT or WikiText-2 test)")
    p.add_argument("--ctx", type=int, default=2048, help="tokens per window (default: %(default)s)")
    p.add_argument("--windows", type=int, help="evaluate only the first N windows (default: all)")
    p.add_argument("--device", help="where the models run (default: cuda where there is one, else cpu)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="compute dtype (default: %(default)s)")
    p.add_argument("--endpoint-url", help="S3 endpoint for an s3:// output (default: AWS_ENDPOINT_URL)")
    cli.add_common_flags(p)
    args = p.parse_args(argv)
    cli.setup_logging(args.log_level)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        evaluate(args.model, args.quantized, text=args.text, ctx=args.ctx, windows=args.windows, device=device,
                 dtype=getattr(torch, args.dtype), storage=StorageOptions(endpoint_url=args.endpoint_url))
    except (ValueError, OSError) as exc:
        return cli.fail(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
