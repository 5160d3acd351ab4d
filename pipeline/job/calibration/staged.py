"""A decoder layer's calibration statistics as staged at the destination, and read back.

One safetensors file per layer (each site's mean |x| and token sample, the map from each
quantized matrix to its site in the metadata), then a JSON record with the file's size and
sha256, written last: a layer with a record that matches its file is done, and a rerun after a
crash reuses it instead of recomputing it, as units are reused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from ...io.storage import Location

CALIBRATION_DIR = "calibration"


@dataclass
class LayerStats:
    """``sites``: site -> (mean |x| ``[channels]`` float32, sample ``[tokens, channels]``);
    ``site_of``: quantized matrix (its leaf) -> its site; a matrix with none is quantized
    without an activation scale, for the reason ``missing`` gives."""

    sites: dict[str, tuple[Tensor, Tensor]]
    site_of: dict[str, str]
    missing: dict[str, str]

    def inputs(self, leaf: str) -> tuple[Tensor, Tensor] | None:
        site = self.site_of.get(leaf)
        return None if site is None else self.sites[site]


def _names(block: str) -> tuple[str, str]:
    return f"{block}.safetensors", f"{block}.json"


def stage(location: Location, block: str, stats: LayerStats) -> None:
    tensors = {}
    for site, (mean, sample) in stats.sites.items():
        tensors[f"{site}.mean"] = mean.contiguous()
        tensors[f"{site}.sample"] = sample.contiguous()
    data = save_safetensors(tensors, metadata={"site_of": json.dumps(stats.site_of, sort_keys=True),
                                               "missing": json.dumps(stats.missing, sort_keys=True)})
    data_name, record_name = _names(block)
    location.write_bytes(data_name, data)
    record = {"block": block, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    location.write_bytes(record_name, json.dumps(record, sort_keys=True).encode())


def staged(location: Location, block: str) -> bool:
    """Whether ``block``'s statistics are staged whole: its record parses and matches its file."""
    data_name, record_name = _names(block)
    if not (location.exists(record_name) and location.exists(data_name)):
        return False
    try:
        record = json.loads(location.read_bytes(record_name))
    except ValueError:
        return False
    return (record.get("block") == block and location.size(data_name) == record.get("size")
            and location.sha256(data_name) == record.get("sha256"))


def load(location: Location, block: str) -> LayerStats:
    """``block``'s staged statistics; a file that does not match its record is refused."""
    data_name, record_name = _names(block)
    data = location.read_bytes(data_name)
    record = json.loads(location.read_bytes(record_name))
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise ValueError(f"{location.url}/{data_name}: the staged calibration statistics do not match their record")
    header_len = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + header_len]).get("__metadata__", {})
    tensors = load_safetensors(data)
    site_of = json.loads(meta.get("site_of", "{}"))
    sites = {site: (tensors[f"{site}.mean"], tensors[f"{site}.sample"]) for site in set(site_of.values())}
    return LayerStats(sites, site_of, json.loads(meta.get("missing", "{}")))
