"""Settings files (YAML, TOML, JSON) read into mappings, and sizes such as ``4GB`` parsed.

Which keys are allowed is ``options.OPTIONS``'s business; this module only reads.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import yaml

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


def format_size(nbytes: int) -> str:
    """The shortest exact spelling ``parse_size`` reads back: ``4GB``, ``64MiB``, ``1000``."""
    fits = [u for u in ("TiB", "GiB", "MiB", "KiB", "TB", "GB", "MB", "KB") if nbytes and nbytes % _UNITS[u.upper()] == 0]
    if not fits:
        return str(nbytes)
    unit = min(fits, key=lambda u: nbytes // _UNITS[u.upper()])
    return f"{nbytes // _UNITS[unit.upper()]}{unit}"


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
