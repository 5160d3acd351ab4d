"""A lock object with an expiry, created atomically on the destination itself.

Two runs that want the same output race to create ``<output>/.lock``; exactly one wins.
A lock past its expiry (its holder died) is removed and the race is run again.
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


@dataclass
class Lock:
    location: Location
    owner: str
    expires: float

    def release(self) -> None:
        holder = read_lock(self.location)
        if holder is not None and holder.get("owner") == self.owner:
            self.location.remove(LOCK_NAME)


def read_lock(location: Location) -> dict | None:
    try:
        return json.loads(location.read_bytes(LOCK_NAME))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return {"owner": "unreadable", "expires": 0}


def acquire(location: Location, ttl_s: float) -> Lock | dict:
    """The lock, or the current holder's record when another run holds it."""
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    for _ in range(2):
        expires = time.time() + ttl_s
        record = json.dumps({"owner": owner, "expires": expires}).encode()
        if location.create_exclusive(LOCK_NAME, record):
            return Lock(location, owner, expires)
        holder = read_lock(location)
        if holder is None:
            continue
        if holder.get("expires", 0) > time.time():
            return holder
        location.remove(LOCK_NAME)
    return read_lock(location) or {"owner": "unknown", "expires": 0}
