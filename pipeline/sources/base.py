"""What every checkpoint source is: a picklable, read-only directory of named files.

The driver resolves a source once (exact revision, file list) and ships it to the workers,
which fetch their tensors by byte range themselves. The kinds of source (files, Hub, synthetic)
subclass ``Source`` here; this module knows none of them.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
from dataclasses import dataclass, field

import torch

from ..io.hf_names import INDEX_NAME, SINGLE_NAME
from ..io.safetensors_io import TensorInfo, read_header, tensor_from_bytes
from ..io.storage import Location

# Files copied through to the output beside the weights.
ASSET_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "preprocessor_config.json",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# The terms the weights are published under travel with them: LICENSE, LICENSE.txt, LICENSE-MIT,
# USE_POLICY.md, NOTICE, COPYING, ... (any case, any suffix), found by listing the source.
LICENCE_FILE = re.compile(r"(LICEN[CS]E|USE_POLICY|NOTICE|COPYING)([._-][A-Za-z0-9._-]*)?", re.IGNORECASE)


def is_licence_file(name: str) -> bool:
    return LICENCE_FILE.fullmatch(name) is not None


class SourceError(ValueError):
    """The source is missing something or holds something we refuse to read."""


@dataclass
class Source:
    """A checkpoint directory: names are file names relative to ``location``."""

    spec: str
    location: Location
    identity: dict = field(default_factory=dict)

    def read_bytes(self, name: str) -> bytes:
        return self.location.read_bytes(name)

    def exists(self, name: str) -> bool:
        return self.location.exists(name)

    def read_json(self, name: str) -> dict:
        try:
            data = json.loads(self.read_bytes(name))
        except FileNotFoundError:
            raise SourceError(f"{self.spec}: {name} is missing") from None
        except (PermissionError, IsADirectoryError) as exc:
            raise SourceError(f"{self.spec}: {name} cannot be read ({exc.strerror})") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SourceError(f"{self.spec}: {name} is not valid JSON ({exc.__class__.__name__})") from None
        if not isinstance(data, dict):
            raise SourceError(f"{self.spec}: {name} is not a JSON object")
        return data

    def header(self, name: str) -> dict[str, TensorInfo]:
        label = f"{self.spec}/{name}"
        if not self.location.exists(name):
            raise SourceError(f"{label} is named in the index but missing")
        size = self.location.size(name)
        head = self.location.read_range(name, 0, min(8, size))
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        body = self.location.read_range(name, 8, length) if 0 < length and 8 + length <= size else b""
        return read_header(io.BytesIO(head + body), size, label)

    def read_tensor(self, name: str, info: TensorInfo) -> torch.Tensor:
        return self.read_tensors([(name, info)])[0]

    def read_tensors(self, wanted: list[tuple[str, TensorInfo]]) -> list[torch.Tensor]:
        """Several tensors, each ``(file, info)``, fetched together as concurrent ranged reads."""
        views = self.location.read_many([(name, info.start, info.nbytes) for name, info in wanted])
        return [tensor_from_bytes(info, view) for (_, info), view in zip(wanted, views)]

    def weight_files(self) -> list[str]:
        """The safetensors files holding the weights; pickle checkpoints are refused."""
        if self.exists(INDEX_NAME):
            index = self.read_json(INDEX_NAME)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise SourceError(f"{self.spec}: {INDEX_NAME} has no weight_map")
            files = sorted(set(weight_map.values()))
            for f in files:
                if not self.exists(f):
                    raise SourceError(f"{self.spec}/{f} is named in {INDEX_NAME} but missing")
            return files
        if self.exists(SINGLE_NAME):
            return [SINGLE_NAME]
        pickles = [n for n in self.location.list() if n.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise SourceError(
                f"{self.spec}: only pickle checkpoints found ({pickles[0]}); they are never unpickled. "
                "Convert the model to safetensors first"
            )
        raise SourceError(f"{self.spec}: no {SINGLE_NAME} or {INDEX_NAME} found")

    def list_files(self) -> list[str]:
        """Names of the files at the top of the checkpoint directory (no subdirectories).

        A local directory is read with symbolic links followed, as ``exists`` and ``read_bytes``
        do: a Hugging Face cache snapshot is nothing but links into its blob store."""
        if not self.location.is_local:
            return self.location.list()
        try:
            with os.scandir(self.location.path("")) as entries:
                return sorted(e.name for e in entries if e.is_file())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def assets(self) -> list[str]:
        """Files copied through to the output: the known tokenizer and generation files, then the
        licence files, from one listing of the source."""
        present = set(self.list_files())
        return [n for n in ASSET_FILES if n in present] + sorted(n for n in present if is_licence_file(n))
