"""Nightly runs: quantize whatever new commits the watched repos have, once each.

An output lives at ``<destination>/<repo>/<commit>/<config-name>/`` and counts as done when
its manifest verifies. A lock object on the output keeps two concurrent runs from doing the
same work; one failing model does not stop the others; a JSON report lands at the destination.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from .io import locks
from .io.storage import Location, StorageOptions
from .job.options import JobOptions, job_settings
from .job.run import JobError, run_job
from .job.settings import load_file
from .output.manifest import IncompleteOutput, verify

REPORT_FORMAT = "sinq-cluster-nightly/1"


@dataclass(frozen=True)
class Resolved:
    commit: str
    source: str  # what jobs.quantize takes as --model


class Resolver(Protocol):
    def resolve(self, repo: str, revision: str) -> Resolved: ...


class HubResolver:
    """The current commit of a branch or tag on the Hugging Face Hub."""

    def resolve(self, repo: str, revision: str) -> Resolved:
        from huggingface_hub import HfApi

        sha = HfApi().model_info(repo, revision=revision).sha
        return Resolved(sha, f"{repo}@{sha}")


class CatalogResolver:
    """Commits and source locations from a local catalogue file:
    ``{repo: {revision: {commit: ..., source: ...}}}`` (YAML or JSON)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.catalog = load_file(path)

    def resolve(self, repo: str, revision: str) -> Resolved:
        try:
            entry = self.catalog[repo][revision]
            return Resolved(str(entry["commit"]), str(entry["source"]))
        except (KeyError, TypeError):
            raise ValueError(f"{self.path}: no entry for {repo}@{revision}") from None


@dataclass
class ConfigSpec:
    name: str
    settings: dict


@dataclass
class WatchEntry:
    repo: str
    revision: str
    destination: str
    configs: list[ConfigSpec]


@dataclass
class WatchList:
    path: str
    destination: str
    entries: list[WatchEntry]
    job: dict = field(default_factory=dict)
    lock_ttl_s: float = 12 * 3600.0


def load_watch_list(path: str | Path) -> WatchList:
    raw = load_file(path)
    label = str(path)
    destination = raw.get("destination")
    if not isinstance(destination, str):
        raise ValueError(f"{label}: 'destination' (where outputs and reports go) is required")
    job = job_settings(raw.get("job") or {}, f"{label}: job")
    entries = []
    for i, item in enumerate(raw.get("models") or []):
        where = f"{label}: models[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("repo"), str):
            raise ValueError(f"{where}: each model needs a 'repo'")
        configs = []
        for j, c in enumerate(item.get("configs") or [{"name": "sinq-4b-g64"}]):
            if not isinstance(c, dict) or not isinstance(c.get("name"), str) or "/" in c["name"]:
                raise ValueError(f"{where}.configs[{j}]: each config needs a 'name' without '/'")
            configs.append(ConfigSpec(c["name"], job_settings({k: v for k, v in c.items() if k != "name"}, f"{where}.configs[{j}]")))
        entries.append(WatchEntry(item["repo"], str(item.get("revision", "main")), item.get("destination", destination), configs))
    if not entries:
        raise ValueError(f"{label}: 'models' lists nothing to watch")
    return WatchList(str(path), destination, entries, job, float(raw.get("lock_ttl_hours", 12)) * 3600)


def _complete(out: Location, hashes: bool) -> bool:
    try:
        verify(out, hashes=hashes)
    except IncompleteOutput:
        return False
    return True


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def run_nightly(
    watch: WatchList, resolver: Resolver, *, storage: StorageOptions | None = None, verify_hashes: bool = False,
    log: Callable[[str], None] = print, job_log: Callable[[str], None] = print,
) -> dict:
    """Process every watched model and config; returns (and writes) the run report.

    An output counts as complete when its manifest verifies, every file's sha256 included unless
    ``verify_hashes`` is False (sizes only: cheaper, blind to a same-size change); one that does not
    is quantized again."""
    storage = storage or StorageOptions()
    started = dt.datetime.now(dt.timezone.utc)
    results = []
    for entry in watch.entries:
        base = {"repo": entry.repo, "revision": entry.revision}
        try:
            resolved = resolver.resolve(entry.repo, entry.revision)
        except Exception as exc:  # noqa: BLE001 - any resolver failure is reported, the others go on
            results.append({**base, "status": "failed", "reason": f"cannot resolve: {_one_line(exc)}"})
            log(f"failed   {entry.repo}@{entry.revision}: cannot resolve: {_one_line(exc)}")
            continue
        for cfg in entry.configs:
            out_url = f"{entry.destination.rstrip('/')}/{entry.repo}/{resolved.commit}/{cfg.name}"
            out = Location(out_url, storage)
            row = {**base, "commit": resolved.commit, "config": cfg.name, "output": out_url}
            results.append(row)
            if _complete(out, verify_hashes):
                row.update(status="skipped", reason="already complete", new=False)
                log(f"skipped  {entry.repo}@{resolved.commit[:12]} {cfg.name}: already complete")
                continue
            row["new"] = True
            try:
                lock = locks.acquire(out, watch.lock_ttl_s)
            except (OSError, ValueError) as exc:  # a store that cannot lock, or cannot be reached
                row.update(status="failed", reason=_one_line(exc))
                log(f"failed   {entry.repo}@{resolved.commit[:12]} {cfg.name}: {row['reason']}")
                continue
            if not isinstance(lock, locks.Lock):
                row.update(status="skipped", reason=f"locked by another run ({lock.get('owner')})")
                log(f"skipped  {entry.repo}@{resolved.commit[:12]} {cfg.name}: {row['reason']}")
                continue
            t0 = time.perf_counter()
            try:
                if _complete(out, verify_hashes):
                    row.update(status="skipped", reason="completed by another run", new=False)
                    continue
                settings = {**watch.job, **cfg.settings}
                opts = JobOptions.from_settings({**settings, "model": resolved.source, "out": out_url})
                opts = dataclasses.replace(opts, storage=dataclasses.replace(
                    opts.storage, endpoint_url=opts.storage.endpoint_url or storage.endpoint_url))
                manifest = run_job(opts, log=job_log, lock=lock)
                row.update(status="done", seconds=round(time.perf_counter() - t0, 2),
                           output_bytes=manifest["totals"]["output_bytes"])
                log(f"done     {entry.repo}@{resolved.commit[:12]} {cfg.name} -> {out_url}")
            except Exception as exc:  # noqa: BLE001 - one release that cannot be quantized never stops the others
                reason = _one_line(exc) if isinstance(exc, (JobError, ValueError, OSError)) else \
                    f"{type(exc).__name__}: {_one_line(exc)}"
                row.update(status="failed", reason=reason, seconds=round(time.perf_counter() - t0, 2))
                log(f"failed   {entry.repo}@{resolved.commit[:12]} {cfg.name}: {row['reason']}")
            finally:
                lock.release()

    counts = {s: sum(r["status"] == s for r in results) for s in ("done", "skipped", "failed")}
    counts["new"] = sum(bool(r.get("new")) for r in results)
    report = {
        "format": REPORT_FORMAT, "watch_list": watch.path, "host": socket.gethostname(),
        "started": started.isoformat(), "finished": dt.datetime.now(dt.timezone.utc).isoformat(),
        "counts": counts, "results": results,
    }
    name = f"_reports/nightly-{started.strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:6]}.json"
    Location(watch.destination, storage).write_bytes(name, (json.dumps(report, indent=2) + "\n").encode())
    report["report"] = f"{watch.destination.rstrip('/')}/{name}"
    if not counts["done"] and not counts["failed"]:
        log("nothing new: every watched model and config is already quantized")
    return report
