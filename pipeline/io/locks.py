"""A lock object with an expiry, created atomically on the destination itself.

Two runs that want the same output race to create ``<output>/.lock``; exactly one wins. A lock
past its expiry (its holder died) is taken over by replacing exactly the record that was read
(``If-Match`` on its ETag), and released the same way, so a run never removes a lock another run
has just taken. A store that ignores these conditions (some S3 servers do, answering every
conditional write with success) would let two runs hold the lock at once: it is probed once per
bucket, and a lock is refused there.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass

from .storage import Location

LOCK_NAME = ".lock"
_WRONG_ETAG = '"0123456789abcdef0123456789abcdef"'
_PROBED: dict[str, str | None] = {}  # store and bucket -> why its locks cannot be exclusive, or None


class LockUnsupported(OSError):
    """The store cannot make a lock exclusive; the message names it and why."""


@dataclass
class Lock:
    location: Location
    owner: str
    expires: float

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
            location.remove(name)
    if _PROBED[store] is not None:
        raise LockUnsupported(f"{location.url}: locks cannot be exclusive on this store: {_PROBED[store]}; "
                              "use a store that honours S3 conditional writes (AWS S3, SeaweedFS, MinIO)")


def acquire(location: Location, ttl_s: float) -> Lock | dict:
    """The lock, or the current holder's record when another run holds it."""
    check_exclusive(location)
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    for _ in range(3):
        expires = time.time() + ttl_s
        record = json.dumps({"owner": owner, "expires": expires}).encode()
        if location.create_exclusive(LOCK_NAME, record):
            return Lock(location, owner, expires)
        held = location.read_tagged(LOCK_NAME)
        if held is None:  # released in between: race again
            continue
        holder = _parse(held[0])
        if holder.get("owner") == owner:  # our write landed, its reply was lost and the retry refused
            return Lock(location, owner, holder.get("expires", expires))
        if holder.get("expires", 0) > time.time():
            return holder
        if location.replace_if(LOCK_NAME, record, held[1]):  # the expired record, and no other, replaced
            return Lock(location, owner, expires)
    return read_lock(location) or {"owner": "unknown", "expires": 0}
