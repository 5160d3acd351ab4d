"""Bytes in and out: storage locations (local or object storage), safetensors headers and
streamed writes, and lock objects. Nothing here knows about models or quantization."""
