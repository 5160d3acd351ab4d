"""Assertions shared by the pipeline tests: what a correct output holds."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from pipeline.output.layout import CARD_NAME
from pipeline.output.manifest import MANIFEST_NAME
from pipeline.architecture import model_buffers
from sinq_ops import QuantConfig, quantize


def read_dir_tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            for k in s.keys():
                assert k not in out, f"{k} appears twice"
                out[k] = s.get_tensor(k)
    return out


def file_bytes(directory: Path, skip: tuple[str, ...] = (MANIFEST_NAME, CARD_NAME)) -> dict[str, bytes]:
    """Every file but the two that name the source (the manifest and the model card): outputs of the
    same weights read from a directory, a bucket or the Hub are equal here. test_output_card checks
    the card's own determinism."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file() and p.name not in skip}


def assert_output_matches_source(out: Path, src: Path, config: QuantConfig) -> None:
    """Quantized tensors equal sinq_ops.quantize of the source, bit for bit; the rest is copied."""
    source = read_dir_tensors(src)
    output = read_dir_tensors(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    sidecar = json.loads((out / "model.safetensors.index.json.meta.json").read_text())
    assert set(index["weight_map"]) == set(output)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in output.values())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers run
    try:
        expected: dict[str, torch.Tensor] = {}
        for name, w in source.items():
            if ".layers." in name and name.endswith("_proj.weight"):
                q = quantize(w, **config.to_dict())
                leaf = name[: -len(".weight")]
                expected.update(q.to_state_dict(leaf))
                assert sidecar[leaf]["meta"] == json.loads(json.dumps(q.metadata()))
            else:
                expected[name] = w
    finally:
        torch.set_num_threads(threads)
    model_config = json.loads((src / "config.json").read_text())
    expected.update({k: v for k, v in model_buffers(model_config).items() if k not in source})
    assert set(expected) == set(output)
    for k, t in expected.items():
        assert output[k].dtype == t.dtype and torch.equal(output[k], t), k
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert (qc["quant_method"], qc["nbits"], qc["group_size"], qc["tiling_mode"]) == (
        "sinq", config.bits, config.group_size, config.tiling,
    )
    assert "lm_head" in qc["modules_to_not_convert"]


def assert_cli_refuses(src: Path, out: Path, capsys, *expected: str, args: tuple[str, ...] = ()) -> str:
    """``jobs.quantize`` refuses ``src`` in one ``error:`` line holding each of ``expected``, and no
    manifest or shard appears at ``out`` (where ``out`` is not the source itself). Returns the line."""
    from jobs import quantize

    assert quantize.main(["--model", str(src), "--out", str(out), "--workers", "1", *args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for piece in expected:
        assert piece in err, (piece, err)
    assert not (out / MANIFEST_NAME).exists()
    if out.resolve() != src.resolve():
        assert not list(out.glob("*.safetensors"))
    return err

