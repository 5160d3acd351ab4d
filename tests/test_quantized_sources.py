"""Quantized sources. FP8 as DeepSeek-V3 and the Qwen3 -FP8 releases ship it: e4m3 (or e5m2) weights
with a float32 weight_scale_inv per block (edge blocks cut short), per row or per tensor; and MXFP4
experts as gpt-oss ships them. They are dequantized on the worker before SINQ, the error is measured
against the true weight, the scales and the source's quantization_config never reach the output, and
the output computes what the dequantized source quantized in memory does. Every other quantized
format is refused, naming it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3Config, Qwen3ForCausalLM

import moe_models
from jobs import quantize as cli
from pipeline.job.options import JobOptions
from pipeline.job.run import run_job
from pipeline.loader import load_quantized, load_source
from pipeline.output.layout import SIDECAR_NAME
from pipeline.output.manifest import MANIFEST_NAME
from pipeline_checks import read_dir_tensors
from sinq_ops import QuantConfig, quantize

pytestmark = pytest.mark.usefixtures("local_ray")

CONFIG = QuantConfig(group_size=32)
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def _expand(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int] | None) -> torch.Tensor:
    """Each weight's own scale, written out without sinq_ops (the test's own reading of the format)."""
    rows, cols = shape
    if block is None:
        return scale.reshape(-1, 1).expand(rows, cols) if scale.numel() == rows else scale.reshape(()).expand(rows, cols)
    r = torch.arange(rows) // block[0]
    c = torch.arange(cols) // block[1]
    return scale[r][:, c]


def _to_fp8(tensors: dict[str, torch.Tensor], names: list[str], dtype, block, per_row) -> dict[str, torch.Tensor]:
    """Replace ``names`` in ``tensors`` by FP8 codes and their ``_scale_inv``; returns the true weights."""
    true = {}
    for name in names:
        w = tensors[name].float()
        rows, cols = w.shape
        if block is None:
            amax = w.abs().amax(dim=1) if per_row else w.abs().amax().reshape(1)
        else:
            amax = torch.zeros(math.ceil(rows / block[0]), math.ceil(cols / block[1]))
            for i in range(amax.shape[0]):
                for j in range(amax.shape[1]):
                    amax[i, j] = w[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]].abs().amax()
        scale = (amax / FP8_MAX[dtype]).clamp(min=1e-12)
        q = (w / _expand(scale, (rows, cols), block)).to(dtype)
        tensors[name] = q
        tensors[name + "_scale_inv"] = scale.reshape(rows, 1) if per_row else scale
        true[name] = q.float() * _expand(scale, (rows, cols), block)
    return true


def _fp8_source(out: Path, *, dtype=torch.float8_e4m3fn, block: tuple[int, int] | None = (40, 40),
                per_row: bool = False) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny Qwen3 whose decoder-layer Linear weights are FP8 with scales; returns it and the true
    (dequantized) weights."""
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=64)
    Qwen3ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
    tensors = load_file(out / "model.safetensors")
    true = _to_fp8(tensors, [n for n in tensors if ".layers." in n and n.endswith("proj.weight")], dtype, block, per_row)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                     **({"weight_block_size": list(block)} if block else {})}
    (out / "config.json").write_text(json.dumps(config))
    return out, true


def _in_memory(src: Path, out: Path) -> torch.nn.Module:
    model = load_source(str(src))
    with torch.no_grad():
        for leaf in json.loads((out / SIDECAR_NAME).read_text()):
            linear = model.get_submodule(leaf)
            linear.weight.copy_(quantize(linear.weight.detach().clone(), **CONFIG.to_dict()).dequantize(torch.float32))
    return model


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize(("dtype", "block", "per_row"), [
    (torch.float8_e4m3fn, (40, 40), False),  # 64 and 96 are not multiples of 40: edge blocks
    (torch.float8_e5m2, None, True),
    (torch.float8_e4m3fn, None, False),
], ids=["e4m3-blocks", "e5m2-per-row", "e4m3-per-tensor"])
def test_fp8_source_is_dequantized_before_sinq(tmp_path: Path, dtype, block, per_row) -> None:
    src, true = _fp8_source(tmp_path / "src", dtype=dtype, block=block, per_row=per_row)
    out = tmp_path / "out"
    manifest = run_job(JobOptions.from_settings({"model": str(src), "out": str(out), "group_size": 32, "workers": 2}),
                       log=lambda _: None)
    source = load_source(str(src))
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(source.get_parameter(name).detach(), true[name])  # the loader reads the format as the test does

    written = read_dir_tensors(out)
    assert not any(n.endswith("_scale_inv") for n in written)
    assert written["model.embed_tokens.weight"].dtype == torch.bfloat16
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "sinq" and "weight_block_size" not in qc and "activation_scheme" not in qc
    assert manifest["source"]["format"] == {"method": "fp8", "weight_block_size": list(block) if block else None}
    # Against the true weights the error is SINQ's usual 4-bit figure, not the codes' distance from them.
    errors = {t["name"]: t["rel_error"] for t in manifest["tensors"]}
    assert len(errors) == 2 * 7 and max(errors.values()) < 0.15
    q = quantize(true[name], **CONFIG.to_dict())
    assert errors[name] == pytest.approx(
        float((true[name] - q.dequantize(torch.float32)).norm() / true[name].norm()), rel=1e-4)

    got, want = _logits(load_quantized(str(out))), _logits(_in_memory(src, out))
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got - want).abs().max()


def _refused(src: Path, out: Path, capsys, *pieces: str) -> None:
    capsys.readouterr()
    assert cli.main(["--model", str(src), "--out", str(out), "--group-size", "32", "--workers", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for piece in pieces:
        assert piece in err, (piece, err)
    assert not (out / MANIFEST_NAME).exists()


@pytest.mark.parametrize("method", ["gptq", "awq", "compressed-tensors", "bitsandbytes", "made-up"])
def test_other_quantized_sources_are_refused_naming_the_format(tmp_path: Path, capsys, method: str) -> None:
    src, _ = _fp8_source(tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4}
    (src / "config.json").write_text(json.dumps(config))
    _refused(src, tmp_path / "out", capsys, "config.json", f"already quantized ({method})")


def test_fp8_weight_without_its_scale_or_a_misfit_scale_is_refused(tmp_path: Path, capsys) -> None:
    src, _ = _fp8_source(tmp_path / "src")
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.0.self_attn.q_proj.weight_scale_inv"]
    tensors["model.layers.1.mlp.up_proj.weight_scale_inv"] = torch.ones(2, 2)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    _refused(src, tmp_path / "out", capsys, "'model.layers.0.self_attn.q_proj.weight'", "no weight_scale_inv")
    tensors["model.layers.0.self_attn.q_proj.weight_scale_inv"] = torch.ones(2, 2)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    _refused(src, tmp_path / "out", capsys, "'model.layers.1.mlp.up_proj.weight_scale_inv' of shape [2, 2]",
             "in 40x40 blocks")


def _mxfp4_gpt_oss(out: Path) -> Path:
    """gpt-oss with its expert matrices in MXFP4, encoded by the test: per 32 weights of a row, the
    power of two that brings them within e2m1's +-6, and each weight's nearest e2m1 value."""
    moe_models.save("gpt_oss", out, fused=True)
    tensors = load_file(out / "model.safetensors")
    table = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        rows = tensors.pop(name).float().transpose(1, 2)  # [experts, out, in]
        e, r, c = rows.shape
        groups = rows.reshape(e, r, c // 32, 32)
        exp = torch.ceil(torch.log2(groups.abs().amax(-1).clamp(min=1e-30) / 6.0))
        codes = ((groups / torch.exp2(exp)[..., None])[..., None] - table).abs().argmin(-1).to(torch.uint8)
        tensors[name + "_blocks"] = (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()
        tensors[name + "_scales"] = (exp + 127).to(torch.uint8)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4",
                                     "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router"]}
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_mxfp4_experts_are_dequantized_before_sinq(tmp_path: Path) -> None:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from test_moe import _in_memory
    from test_moe import _logits as moe_logits

    src = _mxfp4_gpt_oss(tmp_path / "src")
    raw = load_file(src / "model.safetensors")
    name = "model.layers.1.mlp.experts.down_proj"
    true = convert_moe_packed_tensors(raw[name + "_blocks"], raw[name + "_scales"], dtype=torch.float32)
    assert torch.equal(load_source(str(src)).get_parameter(name).detach(), true)  # transformers' own decoding

    out = tmp_path / "out"
    manifest = run_job(JobOptions.from_settings({"model": str(src), "out": str(out), "group_size": 32, "workers": 2}),
                       log=lambda _: None)
    assert manifest["source"]["format"] == {"method": "mxfp4", "weight_block_size": None}
    written = read_dir_tensors(out)
    assert not any(n.endswith(("_blocks", "_scales")) for n in written)
    errors = {t["name"]: t["rel_error"] for t in manifest["tensors"]}
    expert = quantize(true[3].t().contiguous(), **CONFIG.to_dict())
    assert errors[f"{name}.3"] == pytest.approx(
        float((true[3].t() - expert.dequantize(torch.float32)).norm() / true[3].norm()), rel=1e-4)
    leaves = sorted(json.loads((out / SIDECAR_NAME).read_text()))
    got, want = moe_logits(load_quantized(str(out))), moe_logits(_in_memory(src, leaves))
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got - want).abs().max()


def test_fp8_mixture_of_experts_dequantizes_each_expert_before_joining_gate_and_up(tmp_path: Path) -> None:
    from test_moe import _in_memory
    from test_moe import _logits as moe_logits

    src = moe_models.save("qwen3_moe", tmp_path / "src")  # the Hub's per-expert layout, as DeepSeek-V3 ships FP8
    tensors = load_file(src / "model.safetensors")
    names = [n for n in tensors if ".layers." in n and n.endswith("proj.weight")]
    assert any(".experts.3.up_proj." in n for n in names)
    _to_fp8(tensors, names, torch.float8_e4m3fn, (48, 48), False)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [48, 48]}
    (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    manifest = run_job(JobOptions.from_settings({"model": str(src), "out": str(out), "group_size": 32, "workers": 2}),
                       log=lambda _: None)
    assert max(t["rel_error"] for t in manifest["tensors"]) < 0.15
    written = read_dir_tensors(out)
    assert written["model.layers.0.mlp.gate.weight"].dtype == torch.float32  # the router, kept as it was
    leaves = sorted(json.loads((out / SIDECAR_NAME).read_text()))
    got, want = moe_logits(load_quantized(str(out))), moe_logits(_in_memory(src, leaves))
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got - want).abs().max()
