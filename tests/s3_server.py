"""A real S3 HTTP endpoint on 127.0.0.1 (moto's server mode) for the tests that need one."""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from typing import Iterator

import s3fs
from moto.server import ThreadedMotoServer

FAKE_KEY_ID = "AKIAFAKETESTKEY00001"
FAKE_SECRET = "fake/secret/for/the/local/moto/server/only"
_VARS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def s3_server(*buckets: str) -> Iterator[s3fs.S3FileSystem]:
    """Start the endpoint, point the standard AWS variables at it, create ``buckets``."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        with aws_pointed_at(f"http://127.0.0.1:{port}", buckets) as fs:
            yield fs
    finally:
        server.stop()


@contextmanager
def aws_pointed_at(endpoint: str, buckets: tuple[str, ...]) -> Iterator[s3fs.S3FileSystem]:
    """The standard AWS variables pointed at ``endpoint`` with the fake credentials, ``buckets``
    created there; the variables as they were afterwards. Every local S3 server of the tests uses it."""
    saved = {k: os.environ.get(k) for k in _VARS}
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID=FAKE_KEY_ID, AWS_SECRET_ACCESS_KEY=FAKE_SECRET,
                      AWS_DEFAULT_REGION="us-east-1")
    try:
        fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
        for bucket in buckets:
            fs.mkdir(bucket)
        yield fs
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
