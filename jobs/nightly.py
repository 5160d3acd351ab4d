"""Quantize the new commits of watched Hub repos, once each, and write a run report.

    sinq-nightly --watch cluster/watch.yaml [--catalog FILE] [--no-verify-hashes]
    python -m jobs.nightly ...           (the same)

Each watched repo's branch or tag is resolved to a commit (on the Hub, or from a local
catalogue file with --catalog); every config without a complete output at
<destination>/<repo>/<commit>/<config-name>/ is quantized. Exit code 1 if anything failed.
"""

from __future__ import annotations

import argparse
import json
import sys

from jobs import cli
from pipeline.io.storage import StorageOptions


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="sinq-nightly", description=__doc__.split("\n\n")[0])
    p.add_argument("--watch", required=True, help="watch list (YAML or TOML)")
    p.add_argument("--catalog", help="resolve repos from this local catalogue instead of the Hub")
    p.add_argument("--verify-hashes", action=argparse.BooleanOptionalAction, default=True,
                   help="an existing output counts as complete only if every file's sha256 matches its manifest "
                        "(default); --no-verify-hashes checks sizes only, which misses a same-size change")
    p.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    p.add_argument("--quiet-jobs", action="store_true", help="do not print each job's progress lines")
    cli.add_common_flags(p)
    args = p.parse_args(argv)
    cli.setup_logging(args.log_level)
    from pipeline.nightly import CatalogResolver, HubResolver, load_watch_list, run_nightly

    try:
        watch = load_watch_list(args.watch)
        resolver = CatalogResolver(args.catalog) if args.catalog else HubResolver()
        report = run_nightly(
            watch, resolver, storage=StorageOptions(endpoint_url=args.endpoint_url), verify_hashes=args.verify_hashes,
            job_log=(lambda _: None) if args.quiet_jobs else print,
        )
    except (ValueError, OSError) as exc:
        return cli.fail(exc)
    c = report["counts"]
    print(f"nightly: {c['new']} new, {c['done']} done, {c['skipped']} skipped, {c['failed']} failed; report {report['report']}")
    print(json.dumps(c))
    return 1 if c["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
