"""Job settings from YAML or TOML files, with the same keys as the command-line flags."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

import yaml

from .run import JobOptions

JOB_KEYS = {f.name for f in dataclasses.fields(JobOptions)}
SIZE_KEYS = {"max_shard_size", "part_size"}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """``4GB``, ``500MB``, ``2GiB`` or a plain byte count."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (use e.g. 4GB, 500MB, 2GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def load_file(path: str | Path) -> dict[str, Any]:
    """A mapping from a .yaml/.yml/.toml/.json file; the error names the file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ValueError(f"{p}: cannot read ({exc.strerror or exc})") from None
    try:
        data = tomllib.loads(text) if p.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"{p}: not valid {'TOML' if p.suffix == '.toml' else 'YAML'} ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping of settings at the top level")
    return data


def job_settings(mapping: dict[str, Any], label: str) -> dict[str, Any]:
    """Normalise keys (``group-size`` -> ``group_size``) and refuse unknown ones."""
    out = {}
    for key, value in mapping.items():
        name = str(key).replace("-", "_")
        if name == "upload_part_size":
            name = "part_size"
        if name not in JOB_KEYS:
            raise ValueError(f"{label}: unknown setting {key!r}")
        if name in SIZE_KEYS:
            try:
                value = parse_size(value)
            except ValueError as exc:
                raise ValueError(f"{label}: {key}: {exc}") from None
        out[name] = value
    return out
