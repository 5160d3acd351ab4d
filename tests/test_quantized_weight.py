"""QuantizedWeight: serialization in the reference layout, packing, input checks, devices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from matrices import llm_like
from oracle import Quantizer
from sinq.bitpack import BitPack

from sinq_ops import QuantConfig, QuantizedWeight, quantize, quantized_layout, relative_error
from sinq_ops import packing

CONFIGS = [
    QuantConfig(bits=b, group_size=g, tiling=t, method=m, aux=a)
    for m, bit_list in (("sinq", (2, 3, 4, 5, 6, 8)), ("rtn", (4,)), ("nf4", (4,)), ("nf3", (3,)))
    for b in bit_list
    for t in ("1D", "2D")
    for a in ("int8", "fp16")
    for g in (64,)
] + [QuantConfig(bits=4, group_size=128), QuantConfig(bits=3, group_size=32, tiling="2D")]

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _cfg_id(c: QuantConfig) -> str:
    return f"{c.method}-{c.bits}b-g{c.group_size}-{c.tiling}-{c.aux}"


def _tensor_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
def test_state_dict_round_trips_bit_exactly_through_safetensors(cfg: QuantConfig, tmp_path: Path) -> None:
    w = llm_like(256, 384, seed=1)
    q = quantize(w, **cfg.to_dict())
    prefix = "model.layers.0.mlp.up_proj"
    sd = q.to_state_dict(prefix)
    save_file(sd, tmp_path / "q.safetensors")
    meta = json.loads(json.dumps(q.metadata()))
    back = QuantizedWeight.from_state_dict(load_file(tmp_path / "q.safetensors"), meta, prefix)
    assert back.config == cfg and back.shape == q.shape
    again = back.to_state_dict(prefix)
    assert sd.keys() == again.keys()
    assert all(_tensor_equal(sd[k], again[k]) for k in sd)
    assert torch.equal(back.dequantize(), q.dequantize())
    assert q.nbytes == sum(t.numel() * t.element_size() for t in sd.values())
    layout = quantized_layout(q.shape, cfg)
    assert {f"{prefix}.{k}": v for k, v in layout.items()} == {k: (t.dtype, tuple(t.shape)) for k, t in sd.items()}


def _write_reference_layout(out: Path, leaves: dict[str, QuantizedWeight]) -> None:
    """One shard, an HF index and the sidecar, named as the reference's writer names them."""
    tensors: dict[str, torch.Tensor] = {}
    sidecar = {}
    for name, q in leaves.items():
        tensors.update(q.to_state_dict(name))
        sidecar[name] = {"meta": q.metadata()}
    shard = "model-00001-of-00001.safetensors"
    save_file(tensors, out / shard)
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": {k: shard for k in tensors}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    (out / "model.safetensors.index.json.meta.json").write_text(json.dumps(sidecar))


@pytest.mark.parametrize("aux", ["int8", "fp16"])
def test_reference_loader_reads_our_tensors(aux: str, tmp_path: Path) -> None:
    from sinq.patch_model import AutoSINQHFModel

    leaves = {
        f"model.layers.0.{name}": quantize(llm_like(n, k, seed=i), bits=bits, method=method, tiling=tiling, aux=aux)
        for i, (name, n, k, bits, method, tiling) in enumerate([
            ("self_attn.q_proj", 256, 256, 4, "sinq", "1D"),
            ("self_attn.o_proj", 192, 256, 3, "sinq", "1D"),
            ("mlp.up_proj", 128, 320, 4, "nf4", "1D"),
            ("mlp.down_proj", 320, 128, 5, "sinq", "1D"),
            ("mlp.gate_proj", 128, 192, 4, "sinq", "2D"),
        ])
    }
    _write_reference_layout(tmp_path, leaves)
    grouped = AutoSINQHFModel.load_weights_safetensors(str(tmp_path))
    for name, q in leaves.items():
        leaf = grouped[name]
        leaf["meta"]["compute_dtype"] = torch.float32
        theirs = Quantizer.dequantize(leaf["W_q"], leaf["meta"]).float()
        ours = q.dequantize()
        # The reference casts the NF codebook to the scales' dtype, so fp16 scales mean fp16 math.
        fp16_math = aux == "fp16" and q.config.codebook_name is not None
        tol = {"rtol": 2e-3, "atol": 2e-3 * float(ours.abs().max())} if fp16_math else {"rtol": 1e-5, "atol": 1e-7}
        torch.testing.assert_close(theirs, ours, **tol)


def test_tiling_is_recorded_and_inferred_for_reference_metadata() -> None:
    w = llm_like(128, 256, seed=2)
    for aux in ("int8", "fp16"):
        q = quantize(w, tiling="2D", aux=aux)
        meta = q.metadata()
        assert meta["tiling_mode"] == "2D"
        del meta["tiling_mode"]  # as the reference writes it
        back = QuantizedWeight.from_state_dict(q.to_state_dict("x"), meta, "x")
        assert back.config.tiling == "2D"
        assert torch.equal(back.dequantize(), q.dequantize())


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_packing_matches_reference_and_pads_odd_row_counts(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    ref_pack = {2: BitPack.pack_2bit_u8, 3: BitPack.pack_3bit_32, 4: BitPack.pack_4bit_u8,
                5: BitPack.pack_5bit_32, 6: BitPack.pack_6bit_32, 8: BitPack.pack_8bit_u8}[bits]
    codes = torch.randint(0, 1 << bits, (120, 64), generator=g, dtype=torch.uint8)
    ours = packing.pack(codes, bits)
    assert _tensor_equal(ours, ref_pack(codes))
    assert torch.equal(packing.unpack(ours, bits, 120), codes)
    odd = codes[:117]
    assert torch.equal(packing.unpack(packing.pack(odd, bits), bits, 117), odd)


def test_odd_group_count_still_packs_and_dequantizes() -> None:
    w = llm_like(9, 64, seed=4)  # 9 groups: the reference's 4-bit packing needs an even count
    q = quantize(w, bits=4)
    assert q.qweight.shape == (5, 64)
    assert float((q.dequantize() - w).norm() / w.norm()) < 0.2


@pytest.mark.parametrize(
    ("weight", "kwargs", "message"),
    [
        (torch.randn(64), {}, "2-D"),
        (torch.randn(2, 64, 64), {}, "2-D"),
        (torch.randint(0, 5, (64, 64)), {}, "floating point"),
        (torch.full((64, 64), float("nan")), {}, "NaN or Inf"),
        (torch.tensor([[float("inf")] * 64] * 2), {}, "NaN or Inf"),
        (torch.randn(64, 96), {}, "group_size=64 does not divide in_features=96"),
        (torch.randn(96, 128), {"tiling": "2D"}, "divide out_features=96"),
        (torch.randn(64, 64), {"bits": 7}, "bits=7"),
        (torch.randn(64, 64), {"bits": 1}, "bits=1"),
        (torch.randn(64, 64), {"group_size": 60}, "multiple of 8"),
        (torch.randn(64, 64), {"method": "hqq"}, "method='hqq'"),
        (torch.randn(64, 64), {"method": "nf4", "bits": 3}, "needs bits=4"),
        (torch.randn(64, 64), {"tiling": "3D"}, "tiling='3D'"),
        (torch.randn(64, 64), {"aux": "int4"}, "aux='int4'"),
        (torch.full((2, 64), 1e6), {}, "fp16 range"),
        (torch.zeros(0, 64), {}, "empty"),
        ([[1.0] * 64], {}, "torch.Tensor"),
    ],
)
def test_bad_input_gets_a_value_error_naming_the_problem(weight, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        quantize(weight, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fill", ["zeros", "constant", "single_row"])
def test_degenerate_matrices_give_finite_exact_or_close_results(fill: str, device: str) -> None:
    w = {"zeros": torch.zeros(64, 128), "constant": torch.full((64, 128), 0.25),
         "single_row": llm_like(1, 128, seed=0)}[fill].to(device)
    for aux in ("int8", "fp16"):
        q = quantize(w, aux=aux)
        deq = q.dequantize()
        assert bool(torch.isfinite(deq).all())
        assert float((deq - w).abs().max()) <= 1e-3 + 0.1 * float(w.abs().max())


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_computes_where_the_weight_lives(device: str) -> None:
    w = llm_like(256, 512, seed=6)
    q = quantize(w.to(device, torch.bfloat16))
    assert q.qweight.device.type == device and q.scale2.device.type == device
    cpu = quantize(w.to(torch.bfloat16))
    diff = (q.dequantize().cpu() - cpu.dequantize()).abs()
    assert float((diff > 1e-4).float().mean()) <= 1e-3
    assert q.dequantize(torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("tiling", ["1D", "2D"])
def test_row_blocks_and_relative_error_work_in_pieces(tiling: str) -> None:
    """Blocks far smaller than the matrix rebuild the same weight and the same error as one piece."""
    w = llm_like(192, 256, seed=21)
    q = quantize(w, bits=3, tiling=tiling)
    whole = q.dequantize()
    blocks = list(q.row_blocks(3000))
    assert len(blocks) > 2 and all(b.shape[0] % (64 if tiling == "2D" else 1) == 0 for _, b in blocks[:-1])
    assert torch.equal(torch.cat([b for _, b in blocks]), whole)
    assert [r0 for r0, _ in blocks] == list(range(0, 192, blocks[0][1].shape[0]))
    want = float((w.half().float() - whole).norm() / w.half().float().norm())
    assert relative_error(w.half(), q) == pytest.approx(want, rel=1e-5)
