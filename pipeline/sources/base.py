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
from ..io.safetensors_io import MAX_HEADER_BYTES, TensorInfo, read_header, tensor_from_bytes
from ..io.storage import Location
from ..io.containment import check_name, check_size, local_file, read_local

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
        """A small file read whole (config, index, tokenizer, card): inside the checkpoint, a regular
        file, at most ``MAX_SMALL_FILE_BYTES`` (``pipeline.io.containment``)."""
        check_name(self.spec, name)
        if self.location.is_local:
            return read_local(self.spec, self.location.url, name)
        check_size(self.spec, name, self.location.size(name))
        return self.location.read_bytes(name)

    def exists(self, name: str) -> bool:
        return self.location.exists(check_name(self.spec, name))

    def read_json(self, name: str) -> dict:
        try:
            data = json.loads(self.read_bytes(name))
        except FileNotFoundError:
            raise SourceError(f"{self.spec}: {name} is missing") from None
        except (PermissionError, IsADirectoryError) as exc:
            raise SourceError(f"{self.spec}: {name} cannot be read ({exc.strerror})") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SourceError(f"{self.spec}: {name} is not valid JSON ({exc.__class__.__name__})") from None
        except RecursionError:
            raise SourceError(f"{self.spec}: {name} nests its JSON too deeply to be read") from None
        if not isinstance(data, dict):
            raise SourceError(f"{self.spec}: {name} is not a JSON object")
        return data

    def header(self, name: str) -> dict[str, TensorInfo]:
        label = f"{self.spec}/{name}"
        if not self.exists(name):
            raise SourceError(f"{label} is named in the index but missing")
        if self.location.is_local:
            size = local_file(self.spec, self.location.url, name)[1]
        else:
            size = self.location.size(name)
        head = self.location.read_range(name, 0, min(8, size))
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        body = self.location.read_range(name, 8, length) if 0 < length <= MAX_HEADER_BYTES and 8 + length <= size else b""
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
            for f in weight_map.values():
                check_name(f"{self.spec}/{INDEX_NAME}", f)
            files = sorted(set(weight_map.values()))
            for f in files:
                if not self.exists(f):
                    raise SourceError(f"{self.spec}/{f} is named in {INDEX_NAME} but missing")
                self._check_file(f)
            return files
        if self.exists(SINGLE_NAME):
            self._check_file(SINGLE_NAME)
            return [SINGLE_NAME]
        pickles = [n for n in self.location.list() if n.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise SourceError(
                f"{self.spec}: only pickle checkpoints found ({pickles[0]}); they are never unpickled. "
                "Convert the model to safetensors first"
            )
        raise SourceError(f"{self.spec}: no {SINGLE_NAME} or {INDEX_NAME} found")

    def _check_file(self, name: str) -> None:
        """A local file the job reads must lie inside the checkpoint and be a regular file."""
        if self.location.is_local:
            try:
                local_file(self.spec, self.location.url, name)
            except FileNotFoundError:
                raise SourceError(f"{self.spec}/{name} is a link to nothing") from None

    def list_files(self) -> list[str]:
        """Names of the entries at the top of the checkpoint directory that are not directories.

        A local directory is read with symbolic links followed, as ``exists`` and ``read_bytes``
        do: a Hugging Face cache snapshot is nothing but links into its blob store. Special files
        are listed too, so that one named as an asset is refused rather than passed over."""
        if not self.location.is_local:
            return self.location.list()
        try:
            with os.scandir(self.location.path("")) as entries:
                return sorted(e.name for e in entries if not e.is_dir())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def asset_names(self) -> list[str]:
        """Files copied through to the output: the known tokenizer and generation files, then the
        licence files, from one listing of the source."""
        present = set(self.list_files())
        return [n for n in ASSET_FILES if n in present] + sorted(n for n in present if is_licence_file(n))

    def assets(self) -> list[str]:
        """``asset_names``, checked (``check_files``)."""
        names = self.asset_names()
        self.check_files(names)
        return names

    def check_files(self, names: list[str]) -> None:
        """Read each of ``names`` as the job will (inside the checkpoint, a regular file of bounded
        size) and parse a JSON one: a job refuses at plan time what it would otherwise publish, or
        fail on only at the end."""
        for name in names:
            try:
                data = self.read_bytes(name)
            except FileNotFoundError:
                raise SourceError(f"{self.spec}/{name} is a link to nothing") from None
            if name.endswith(".json"):
                try:
                    json.loads(data)
                except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
                    raise SourceError(f"{self.spec}/{name} is not valid JSON ({exc.__class__.__name__}), so the "
                                      "output could not load it") from None
