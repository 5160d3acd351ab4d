"""Perplexity of a source model and of its quantized output on the same token windows.

    sinq-evaluate --model SRC --quantized OUT [--text FILE] [--ctx 2048] [--windows N] [--engine URL]
    python -m jobs.evaluate ...          (the same)

Windows are non-overlapping, cut from the start of the text (default: WikiText-2 test, word
level, from $SINQ_EVAL_TEXT or ../shared/data/wikitext2_test.txt). SRC is a local directory, an
s3:// URL or a Hub repo org/name[@revision]; OUT a local directory or s3://. Prints both
perplexities, their ratio and the time taken, and adds eval.json to the quantized output. With
``--engine URL`` the quantized output's perplexity comes from the serving engine at URL (vLLM's
OpenAI-compatible server, serving OUT) through its own prompt log-probabilities.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from jobs import cli
from pipeline.io.storage import Location, StorageOptions

if TYPE_CHECKING:
    from pipeline.engine import Engine

DEFAULT_TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext2_test.txt"
DTYPES = ("float32", "bfloat16", "float16")


def default_text() -> str:
    return os.environ.get("SINQ_EVAL_TEXT", str(DEFAULT_TEXT))


def evaluate(model: str, quantized: str, *, text: str, ctx: int = 2048, windows: int | None = None,
             device: str = "cpu", dtype: "torch.dtype | None" = None, storage: StorageOptions | None = None,
             engine: "Engine | None" = None, log=print) -> dict:
    """Evaluate both models on the same windows; records eval.json in ``quantized``.

    ``model`` is any source but a synthetic one: a local directory, ``s3://...`` or a Hub repo
    ``org/name[@revision]`` (the commit the output was quantized from, when its manifest names the
    same spec). ``quantized`` is a local directory or ``s3://...``; ``storage`` serves both.
    ``engine`` (``pipeline.engine.Engine``), when given, serves ``quantized`` and measures it.
    """
    import torch

    from pipeline.evaluate import check_evaluable, perplexity, pinned_spec, report, text_windows
    from pipeline.sources.tokenizer import load_tokenizer
    from pipeline.loader import load_quantized, load_source
    from pipeline.output.card import record_evaluation
    from pipeline.output.manifest import verify

    dtype = dtype or torch.float32
    storage = storage or StorageOptions()
    dest = Location(quantized, storage)
    source = check_evaluable(pinned_spec(model, dest), storage)
    verify(dest, hashes=False)  # a missing or incomplete output is refused before the source is read
    if engine is not None:  # and an engine that does not answer, or serves something else
        from pipeline.engine import check_serves

        served = check_serves(engine, quantized, ctx)
    if source.identity.get("commit"):
        log(f"source {model} at commit {source.identity['commit']}")

    ids = text_windows(load_tokenizer(source), Path(text).read_text(), ctx, windows)
    log(f"evaluating on {ids.shape[0]} windows of {ctx} tokens from {text}")
    source_model = load_source(source, device=device, dtype=dtype)
    src = perplexity(source_model, ids, device)
    del source_model
    log(f"source     ppl {src.ppl:.4f} ({src.seconds:.1f} s)")
    if engine is None:
        quant = perplexity(load_quantized(quantized, device=device, dtype=dtype, storage=storage), ids, device)
    else:
        from pipeline.engine import engine_perplexity

        quant = engine_perplexity(engine, ids)
    log(f"quantized  ppl {quant.ppl:.4f} ({quant.seconds:.1f} s{', served by ' + engine.public_url if engine else ''})")
    result = report(src, quant, text=text, ctx=ctx)
    if engine is not None:
        result["quantized"]["engine"] = {"url": engine.public_url, "model": served}
    log(f"ratio      {result['ppl_ratio']:.4f}")
    record_evaluation(dest, result)
    return result


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="sinq-evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True,
                   help="source checkpoint: local directory, s3:// URL or Hub repo org/name[@revision] "
                        "(not synthetic://)")
    p.add_argument("--quantized", required=True, help="quantized output (local directory or s3://)")
    p.add_argument("--text", default=default_text(), help="evaluation text (default: $SINQ_EVAL_TEXT or WikiText-2 test)")
    p.add_argument("--ctx", type=int, default=2048, help="tokens per window (default: %(default)s)")
    p.add_argument("--windows", type=int, help="evaluate only the first N windows (default: all)")
    p.add_argument("--device", help="where the models run (default: cuda where there is one, else cpu)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="compute dtype (default: %(default)s)")
    p.add_argument("--engine", metavar="URL",
                   help="measure the quantized output through the serving engine at URL (an OpenAI-compatible "
                        "server such as vLLM's, serving OUT) from its prompt log-probabilities")
    p.add_argument("--engine-model", metavar="NAME", help="the model id the engine serves OUT as (default: its only one)")
    p.add_argument("--endpoint-url", help="S3 endpoint for an s3:// source or output (default: AWS_ENDPOINT_URL)")
    cli.add_common_flags(p)
    args = p.parse_args(argv)
    cli.setup_logging(args.log_level)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        from pipeline.engine import Engine

        engine = Engine(args.engine, args.engine_model or "") if args.engine else None  # ValueError: one line
        evaluate(args.model, args.quantized, text=args.text, ctx=args.ctx, windows=args.windows, device=device,
                 dtype=getattr(torch, args.dtype), storage=StorageOptions(endpoint_url=args.endpoint_url),
                 engine=engine)
    except (ValueError, OSError) as exc:
        return cli.fail(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
