"""Where a job may write: never into its own source, and one job at a time.

An output written over its source destroys the checkpoint it was made from (config.json and
README.md have the same names in both), and a source inside an output is one a rerun with
``--overwrite`` would remove files from. Two jobs writing one destination at once leave one
model's shards beside the other's manifest. Both are refused here, before any work.
"""

from __future__ import annotations

import logging
import os

from ..io import locks
from ..io.storage import Location
from ..sources import Source
from .errors import JobError

# A job renews its lock every fifth of this (``locks.kept_alive``): a job whose driver died on
# another machine frees its destination within this time; on the same machine, at once.
JOB_LOCK_TTL_S = 15 * 60.0
logger = logging.getLogger(__name__)


def _place(location: Location) -> tuple[str, str]:
    """(store, path) for comparing two locations however they were spelled: a local path with its
    links resolved; an object store by protocol and endpoint, and bucket/key."""
    if location.is_local:
        return "file", os.path.realpath(location.url)
    protocol, rest = location.url.split("://", 1)
    protocol = "s3" if protocol == "s3a" else protocol
    endpoint = location.options.for_protocol(protocol).get("endpoint_url", "")
    return f"{protocol}|{endpoint}", rest.strip("/")


def check_apart(source: Source, dest: Location) -> None:
    """Refuse an output that is its source, lies inside it, or holds it."""
    (src_store, src_path), (out_store, out_path) = _place(source.location), _place(dest)
    if src_store != out_store:
        return
    if src_path == out_path:
        how = "is the source itself"
    elif out_path.startswith(src_path.rstrip("/") + "/"):
        how = "lies inside the source"
    elif src_path.startswith(out_path.rstrip("/") + "/"):
        how = "holds the source"
    else:
        return
    raise JobError(f"--out {dest.url} {how} ({source.spec}); an output is written apart from its source: choose "
                   "another --out")


def take(dest: Location) -> locks.Lock | None:
    """This job's lock on ``dest``, or ``JobError`` naming the run that holds it. A store that
    cannot make a lock exclusive (``locks.LockUnsupported``, or a protocol other than a local path
    and s3://) is written without one, as it always could be, and the log says so."""
    try:
        lock = locks.acquire(dest, JOB_LOCK_TTL_S)
    except (locks.LockUnsupported, locks.NoConditionalWrites) as exc:
        logger.warning("writing %s without a lock: %s", dest.url, exc)
        return None
    except OSError as exc:
        raise JobError(f"cannot write to {dest.url}: {exc.strerror or exc}") from None
    if not isinstance(lock, locks.Lock):
        raise JobError(f"{dest.url} is being written by another job ({locks.describe(lock)}); wait for it to end, or "
                       "choose another --out")
    return lock
