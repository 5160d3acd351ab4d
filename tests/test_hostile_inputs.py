"""Bad and hostile checkpoints: each gets one clear line naming the file and tensor, a
non-zero exit, and nothing committed at the destination."""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path
from typing import Callable

import pytest
from safetensors.torch import load_file, save_file

from jobs import quantize as cli
from checkpoints import write_llama_checkpoint
from pipeline_checks import assert_cli_refuses
from pipeline.output.manifest import MANIFEST_NAME

W = "model.layers.0.mlp.up_proj.weight"


pytestmark = pytest.mark.usefixtures("local_ray")


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return write_llama_checkpoint(tmp_path_factory.mktemp("good") / "m", layers=1, hidden=64, intermediate=128,
                                  vocab=64, shards=1, seed=9)


def _raw(path: Path, header: dict | bytes, data: bytes) -> None:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _header_of(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _edit_header(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        f = d / "model.safetensors"
        header, data = _header_of(f)
        edit(header)
        _raw(f, header, data)
    return apply


def _entry(h: dict) -> dict:
    return h[W]


def _truncate(d: Path) -> None:
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


def _truncate_to(n: int) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        f = d / "model.safetensors"
        f.write_bytes(f.read_bytes()[:n])
    return apply


def _hole_before_w(d: Path) -> None:
    """Eight unclaimed bytes just before W: every entry still matches its own bytes."""
    f = d / "model.safetensors"
    header, data = _header_of(f)
    start = header[W]["data_offsets"][0]
    for name, entry in header.items():
        if name != "__metadata__" and entry["data_offsets"][0] >= start:
            entry["data_offsets"] = [o + 8 for o in entry["data_offsets"]]
    _raw(f, header, data[:start] + b"\0" * 8 + data[start:])


def _last_past_the_end(h: dict) -> None:
    """The last tensor claims 1000 more rows than the file holds, its shape saying the same."""
    last = max((v for k, v in h.items() if k != "__metadata__"), key=lambda v: v["data_offsets"][1])
    start, end = last["data_offsets"]
    row = (end - start) // last["shape"][0]
    last["shape"][0] += 1000
    last["data_offsets"] = [start, end + 1000 * row]


def _trailing_bytes(d: Path) -> None:
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes() + b"\0" * 16)


def _huge_header(d: Path) -> None:
    f = d / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[:8] = struct.pack("<Q", len(raw) * 4)
    f.write_bytes(bytes(raw))


def _garbage_header(d: Path) -> None:
    f = d / "model.safetensors"
    header, data = _header_of(f)
    n = len(json.dumps(header).encode())
    _raw(f, b"{" + b"x" * (n - 1), data)


def _overlap(h: dict) -> None:
    a, b = h[W]["data_offsets"]
    other = next(k for k, v in h.items() if k not in (W, "__metadata__") and v["data_offsets"][0] == b)
    start, end = h[other]["data_offsets"]
    h[other]["data_offsets"] = [start - 8, end - 8]


def _rename(old: str, new: str) -> Callable[[dict], None]:
    def apply(h: dict) -> None:
        h[new] = h.pop(old)
    return apply


def _duplicate(d: Path) -> None:
    f = d / "model.safetensors"
    header, data = _header_of(f)
    text = json.dumps(header)
    entry = json.dumps(header[W])
    text = text[:-1] + f', "{W}": {entry}' + "}"
    _raw(f, text.encode(), data)


def _split_with_index(d: Path, weight_map_edit: Callable[[dict], None]) -> None:
    tensors = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[:5]}, d / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file({n: tensors[n] for n in names[5:]}, d / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    weight_map = {n: "model-00001-of-00002.safetensors" if i < 5 else "model-00002-of-00002.safetensors"
                  for i, n in enumerate(names)}
    weight_map_edit(weight_map)
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _nan(d: Path) -> None:
    tensors = load_file(d / "model.safetensors")
    tensors[W][1, 2] = float("inf")
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


class _LeavesAMark:
    """Unpickling this creates ``marker``: proof that whoever unpickled it ran its code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _booby_trapped_pickle(marker: Path) -> bytes:
    return pickle.dumps({W: _LeavesAMark(marker)})


CASES = {
    "truncated file": (_truncate, ["model.safetensors", "tensor data runs past the end of the file"]),
    "truncated inside the length prefix": (_truncate_to(5), ["model.safetensors", "truncated safetensors file (5 bytes)"]),
    "header length beyond the file": (_huge_header, ["model.safetensors", "header length", "exceeds the file size"]),
    "header JSON does not parse": (_garbage_header, ["model.safetensors", "not valid JSON"]),
    "overlapping offsets": (_edit_header(_overlap), ["model.safetensors", "overlaps another tensor"]),
    "a hole between tensors": (_hole_before_w, ["model.safetensors", W, "leaves a gap before it"]),
    "offsets past the end": (_edit_header(_last_past_the_end), ["model.safetensors", "tensor data runs past the end of the file"]),
    "bytes after the last tensor": (_trailing_bytes, ["model.safetensors", "16 bytes after the last tensor"]),
    "undefined dtype": (_edit_header(lambda h: _entry(h).update(dtype="F7")), ["model.safetensors", W, "'F7'"]),
    "shape does not match bytes": (_edit_header(lambda h: _entry(h).update(shape=[128, 65])), ["model.safetensors", W, "[128, 65]", "needs 16640 bytes, its offsets span 16384"]),
    "duplicate tensor names": (_duplicate, ["model.safetensors", W, "named twice"]),
    "index names a missing shard": (lambda d: _split_with_index(d, lambda m: m.update({W: "model-00009-of-00002.safetensors"})),
                                    ["model-00009-of-00002.safetensors", "missing"]),
    "index names an absent tensor": (lambda d: _split_with_index(d, lambda m: m.update({"model.layers.0.ghost.weight": m[W]})),
                                     ["model.layers.0.ghost.weight", "does not hold it"]),
    "name with a slash": (_edit_header(_rename(W, "model.layers.0/../../etc/passwd")), ["model.safetensors", "etc/passwd", "not a plain dotted name"]),
    "name with dot-dot": (_edit_header(_rename(W, "model.layers.0.mlp..weight")), ["model.safetensors", "mlp..weight", "not a plain dotted name"]),
    "name with a control character": (_edit_header(_rename(W, "model.layers.0.mlp.up\x07.weight")), ["model.safetensors", "\\x07", "not a plain dotted name"]),
    "a weight with Inf": (_nan, ["model.safetensors", W, "NaN or Inf"]),
    "config.json missing": (lambda d: (d / "config.json").unlink(), ["config.json is missing"]),
    "config.json unreadable": (lambda d: (d / "config.json").write_text("{not json"), ["config.json", "not valid JSON"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_checkpoint_is_refused_with_nothing_committed(case: str, good: Path, tmp_path: Path, capsys) -> None:
    mutate, expected = CASES[case]
    src = tmp_path / "src"
    shutil.copytree(good, src)
    mutate(src)
    assert_cli_refuses(src, tmp_path / "out", capsys, *expected)


def test_a_pickle_checkpoint_is_refused_and_never_unpickled(good: Path, tmp_path: Path, capsys) -> None:
    marker = tmp_path / "unpickled"
    payload = _booby_trapped_pickle(marker)
    pickle.loads(payload)[W].close()  # the trap works: unpickling it leaves the marker
    assert marker.exists()
    marker.unlink()

    src = tmp_path / "src"
    shutil.copytree(good, src)
    (src / "model.safetensors").unlink()
    (src / "model.bin").write_bytes(payload)
    out = tmp_path / "out"
    assert cli.main(["--model", str(src), "--out", str(out), "--workers", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert "model.bin" in err and "never unpickled" in err, err
    assert not marker.exists()
    assert not (out / MANIFEST_NAME).exists()
    assert not list(out.glob("model-*.safetensors"))


def test_group_size_error_says_which_tensor_and_how_to_fix(good: Path, tmp_path: Path, capsys) -> None:
    assert cli.main(["--model", str(good), "--out", str(tmp_path / "o"), "--group-size", "48"]) == 1
    err = capsys.readouterr().err
    assert "model.layers.0.mlp.down_proj.weight has in_features=128, not divisible by group size 48" in err
    assert "--exclude" in err and "pick a group size" in err


def test_a_complete_output_of_another_model_is_kept_unless_overwrite(good: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert cli.main(["--model", str(good), "--out", str(out), "--workers", "1"]) == 0
    before = (out / MANIFEST_NAME).read_bytes()
    assert cli.main(["--model", str(good), "--out", str(out), "--bits", "3", "--workers", "1"]) == 1
    assert ("already holds a complete output of another job (model, config, output format, tensor selection or tool "
            "version); pass --overwrite") in capsys.readouterr().err
    assert (out / MANIFEST_NAME).read_bytes() == before
    assert cli.main(["--model", str(good), "--out", str(out), "--workers", "1"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert cli.main(["--model", str(good), "--out", str(out), "--bits", "3", "--workers", "1", "--overwrite"]) == 0
    assert json.loads((out / MANIFEST_NAME).read_text())["quantization"]["bits"] == 3
