"""A lock object with an expiry, created atomically on the destination itself.

Two runs that want the same output race to create ``<output>/.lock``; exactly one wins. A lock
past its expiry (its holder died) is taken over by replacing exactly the record that was read
(``If-Match`` on its ETag), and released the same way, so a run never removes a lock another run
has just taken. A store that ignores these conditions (some S3 servers do, answering every
conditional write with success) would let two runs hold the lock at once: it is probed once per
bucket, and a lock is refused there.

A holder renews its lock while it works (``kept_alive``), so the expiry can be short and a lock
whose holder died on another machine frees itself soon; one whose holder died on this machine
(its process is gone) is taken over at once, so a rerun after a crash does not wait.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from .storage import Location, NoConditionalWrites

LOCK_NAME = ".lock"
_WRONG_ETAG = '"0123456789abcdef0123456789abcdef"'
_PROBED: dict[str, str | None] = {}  # store and bucket -> why its locks cannot be exclusive, or None
logger = logging.getLogger(__name__)


__all__ = ["LOCK_NAME", "Lock", "LockUnsupported", "NoConditionalWrites", "acquire", "describe", "kept_alive",
           "read_lock"]


class LockUnsupported(OSError):
    """The store cannot make a lock exclusive; the message names it and why."""


@dataclass
class Lock:
    location: Location
    owner: str
    expires: float
    ttl_s: float

    def renew(self) -> bool:
        """Push the expiry ``ttl_s`` ahead, replacing exactly this run's record; False when the
        lock is no longer this run's (it expired and another run took it over)."""
        held = self.location.read_tagged(LOCK_NAME)
        if held is None or _parse(held[0]).get("owner") != self.owner:
            return False
        expires = time.time() + self.ttl_s
        if not self.location.replace_if(LOCK_NAME, _record(self.owner, expires), held[1]):
            return False
        self.expires = expires
        return True

    def release(self) -> None:
        """Remove the lock if this run still holds it (a run that outlived its expiry may not)."""
        held = self.location.read_tagged(LOCK_NAME)
        if held is not None and _parse(held[0]).get("owner") == self.owner:
            self.location.replace_if(LOCK_NAME, None, held[1])


def _parse(data: bytes) -> dict:
    try:
        record = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return {"owner": "unreadable", "expires": 0}
    return record if isinstance(record, dict) else {"owner": "unreadable", "expires": 0}


def _record(owner: str, expires: float) -> bytes:
    return json.dumps({"owner": owner, "expires": expires}).encode()


def _dead_here(owner: object) -> bool:
    """Whether ``owner`` (``host:pid:nonce``) names a process of this machine that no longer runs."""
    host, _, rest = str(owner).partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's live process
        return False
    return False


def describe(holder: dict) -> str:
    """The holder of a lock, for an error line: its owner and when its lock expires."""
    expires = holder.get("expires")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(expires)) if isinstance(expires, (int, float)) else "?"
    return f"{holder.get('owner', 'unknown')}, lock held until {when} unless renewed"


def read_lock(location: Location) -> dict | None:
    held = location.read_tagged(LOCK_NAME)
    return None if held is None else _parse(held[0])


def check_exclusive(location: Location) -> None:
    """Raise ``LockUnsupported`` where the store would let a conditional write that must fail succeed.

    Probed with a scratch object beside the lock: creating it again with ``If-None-Match: *``,
    and replacing or deleting it under a wrong ``If-Match``, must all be refused."""
    if location.is_local:
        return
    opts = location.options.for_protocol("s3")
    store = f"{opts.get('endpoint_url', '')}|{opts.get('profile', '')}|{location.url.split('/')[2]}"
    if store not in _PROBED:
        name = f".lock-probe-{uuid.uuid4().hex[:12]}"
        try:
            location.create_exclusive(name, b"probe")
            if location.create_exclusive(name, b"again"):
                _PROBED[store] = "it ignores If-None-Match (a second exclusive create succeeded)"
            elif location.replace_if(name, b"again", _WRONG_ETAG):
                _PROBED[store] = "it ignores If-Match (a replace under a wrong ETag succeeded)"
            elif location.replace_if(name, None, _WRONG_ETAG):
                _PROBED[store] = "it ignores If-Match on DELETE (a delete under a wrong ETag succeeded)"
            else:
                _PROBED[store] = None
        finally:
            try:
                location.remove(name)
            except OSError:  # a store that refused the probe refuses this too: the probe's error is the one told
                pass
    if _PROBED[store] is not None:
        raise LockUnsupported(f"{location.url}: locks cannot be exclusive on this store: {_PROBED[store]}; "
                              "use a store that honours S3 conditional writes (AWS S3, SeaweedFS, MinIO)")


def acquire(location: Location, ttl_s: float) -> Lock | dict:
    """The lock, or the current holder's record when another run holds it."""
    check_exclusive(location)
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    for _ in range(3):
        expires = time.time() + ttl_s
        record = _record(owner, expires)
        if location.create_exclusive(LOCK_NAME, record):
            return Lock(location, owner, expires, ttl_s)
        held = location.read_tagged(LOCK_NAME)
        if held is None:  # released in between: race again
            continue
        holder = _parse(held[0])
        if holder.get("owner") == owner:  # our write landed, its reply was lost and the retry refused
            return Lock(location, owner, holder.get("expires", expires), ttl_s)
        if holder.get("expires", 0) > time.time() and not _dead_here(holder.get("owner")):
            return holder
        if location.replace_if(LOCK_NAME, record, held[1]):  # the expired record, and no other, replaced
            return Lock(location, owner, expires, ttl_s)
    return read_lock(location) or {"owner": "unknown", "expires": 0}


@contextmanager
def kept_alive(lock: Lock) -> Iterator[Lock]:
    """Renew ``lock`` in the background every fifth of its time to live while the block runs."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(lock.ttl_s / 5):
            try:
                if not lock.renew():
                    logger.warning("%s/%s: this run's lock was taken over by another run", lock.location.url, LOCK_NAME)
                    return
            except OSError as exc:  # the store is unreachable for now: try again at the next beat
                logger.warning("%s/%s: renewing the lock failed: %s", lock.location.url, LOCK_NAME, exc)

    thread = threading.Thread(target=beat, name="lock-renewal", daemon=True)
    thread.start()
    try:
        yield lock
    finally:
        stop.set()
        thread.join()
