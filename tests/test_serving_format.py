"""``--format compressed-tensors``: SINQ written in the layout serving engines load, its column scales
folded into the model's other tensors.

The oracle is SINQ applied in memory to the float model with the same constrained scales and no
folding at all: each matrix replaced by its dequantization with the column scale applied, a
producer's rows scaled back where its rows carried the next matrix's scale. The output, loaded with
``load_quantized`` from its pack-quantized tensors and folded norms, must compute the same logits.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GemmaConfig,
                          GemmaForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM, StableLmConfig, StableLmForCausalLM)

from pipeline.io.storage import Location
from pipeline.job.options import JobOptions
from pipeline.job.plan import make_plan
from pipeline.job.run import run_job, run_key
from pipeline.job.unit import process_unit
from pipeline.loader import load_quantized
from pipeline.output.layout import CT_SUFFIXES
from pipeline.sources import open_source
from pipeline_checks import assert_cli_refuses, file_bytes, read_dir_tensors
from sinq_ops import QuantConfig, quantize
from sinq_ops.columns import heads_scale_to_kv, shared_column_scale, tied_column_scale
from sinq_ops.compressed import SUFFIXES

CONFIG = QuantConfig(bits=4, group_size=32)
G = CONFIG.group_size
DIMS = dict(vocab_size=384, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=False)
FAMILIES = {
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=32)),  # q_norm and k_norm after the projections
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),  # q, k and v biases: v's is scaled with its rows
    "llama": (LlamaConfig, LlamaForCausalLM, dict(attention_bias=True, mlp_bias=True)),  # up's bias too
    "mistral": (MistralConfig, MistralForCausalLM, dict(num_key_value_heads=1)),  # every query head on one KV head
    "gemma": (GemmaConfig, GemmaForCausalLM, dict(head_dim=32)),  # norms of x * (1 + w)
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, dict(head_dim=32)),  # and the MLP fed by pre_feedforward_layernorm
    "gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM, dict(head_dim=32)),
}


def _save(tmp: Path, family: str, seed: int = 0, **extra) -> tuple[Path, torch.nn.Module]:
    config_cls, model_cls, kw = FAMILIES[family] if family in FAMILIES else extra.pop("classes")
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**DIMS, **kw, **extra})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):  # norms and biases that are not all ones and zeros
                p.copy_((1 if "norm" in name and "gemma" not in family else 0) + 0.2 * torch.randn_like(p))
    src = tmp / f"{family}-src"
    model.save_pretrained(src)
    return src, model


def _deq(w: torch.Tensor, scale: torch.Tensor, scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    q = quantize(w, **{**CONFIG.to_dict(), "aux": "fp16"}, backend="torch", column_scale=scale, zero_in_range=True,
                 scale_dtype=scale_dtype)
    return q.dequantize(torch.float32, apply_scale2=False) * scale[None, :]  # the scale itself, not its fp16 copy


def in_memory_served(model: torch.nn.Module, scale_dtype: torch.dtype) -> torch.nn.Module:
    """``model`` with SINQ under the serving constraints applied in memory, nothing folded; group
    scales in ``scale_dtype``, as the output stores them."""
    with torch.no_grad():
        for layer in model.model.layers:
            attention_served(layer.self_attn, model.config, scale_dtype)
            mlp_served(layer.mlp, scale_dtype)
    return model


def attention_served(at: torch.nn.Module, cfg, scale_dtype: torch.dtype) -> torch.Tensor:
    """q/k/v/o of one layer replaced in memory: o's scale tied per KV head (v's rows carry it), q/k/v
    taking v's own scale. Returns that shared scale."""
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    s_o = tied_column_scale(at.o_proj.weight, G, heads=heads, kv_heads=kv)
    s_vrows = heads_scale_to_kv(s_o, heads=heads, kv_heads=kv)
    s_a = shared_column_scale([at.v_proj.weight], G)  # the lead reader's own scale
    v_rows = at.v_proj.weight * s_vrows[:, None]
    at.q_proj.weight.copy_(_deq(at.q_proj.weight, s_a, scale_dtype))
    at.k_proj.weight.copy_(_deq(at.k_proj.weight, s_a, scale_dtype))
    at.v_proj.weight.copy_(_deq(v_rows, s_a, scale_dtype) / s_vrows[:, None])
    at.o_proj.weight.copy_(_deq(at.o_proj.weight, s_o, scale_dtype))
    return s_a


def mlp_served(mlp: torch.nn.Module, scale_dtype: torch.dtype, scale: torch.Tensor | None = None) -> None:
    """A SwiGLU MLP replaced in memory: down's own scale carried by up's rows, gate/up taking up's own
    scale (or ``scale``, shared with other readers of the same input)."""
    s_d = shared_column_scale([mlp.down_proj.weight], G)
    s_m = shared_column_scale([mlp.up_proj.weight], G) if scale is None else scale
    up_rows = mlp.up_proj.weight * s_d[:, None]
    mlp.gate_proj.weight.copy_(_deq(mlp.gate_proj.weight, s_m, scale_dtype))
    mlp.up_proj.weight.copy_(_deq(up_rows, s_m, scale_dtype) / s_d[:, None])
    mlp.down_proj.weight.copy_(_deq(mlp.down_proj.weight, s_d, scale_dtype))


def _quantize(src: Path, out: Path, **opts) -> dict:
    return run_job(JobOptions(model=str(src), out=str(out), quant=opts.pop("quant", CONFIG),
                              output_format="compressed-tensors", **opts), in_process=True)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_output_computes_what_unfolded_sinq_computes_in_memory(tmp_path: Path, family: str) -> None:
    src, model = _save(tmp_path, family)
    out = tmp_path / "out"
    manifest = _quantize(src, out)
    ids = torch.randint(0, DIMS["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        float_logits = model(ids).logits
        scale_dtype = read_dir_tensors(out)["model.layers.0.mlp.down_proj.weight_scale"].dtype
        want = in_memory_served(model, scale_dtype)(ids).logits
        got = load_quantized(str(out))(ids).logits
    assert (got - want).abs().max() < 2e-4 * want.abs().max(), (got - want).abs().max()
    assert (want - float_logits).abs().max() > 1e-3  # it is quantized
    placed = manifest["structure"]["column_scales"]
    assert placed["self_attn.o_proj"].startswith("folded into self_attn.v_proj rows (tied")
    assert placed["mlp.down_proj"] == "folded into mlp.up_proj rows"
    assert placed["self_attn.q_proj"].endswith("folded into input_layernorm")
    # the scales are SINQ's, not ones: the norms now differ from the source's
    tensors = read_dir_tensors(out)
    source = read_dir_tensors(src)
    assert not torch.equal(tensors["model.layers.0.input_layernorm.weight"], source["model.layers.0.input_layernorm.weight"])


def test_layout_is_what_serving_engines_read(tmp_path: Path) -> None:
    src, _ = _save(tmp_path, "qwen3")
    out = tmp_path / "out"
    _quantize(src, out)
    assert SUFFIXES == CT_SUFFIXES
    tensors = read_dir_tensors(out)
    leaf = "model.layers.1.mlp.down_proj"
    assert {k for k in tensors if k.startswith(leaf)} == {f"{leaf}.{s}" for s in SUFFIXES}
    assert (tensors[f"{leaf}.weight_packed"].dtype, list(tensors[f"{leaf}.weight_packed"].shape)) == (torch.int32, [128, 32])
    assert list(tensors[f"{leaf}.weight_scale"].shape) == [128, 8]
    assert list(tensors[f"{leaf}.weight_zero_point"].shape) == [16, 8]
    assert tensors[f"{leaf}.weight_shape"].tolist() == [128, 256]
    assert not any(".W_q" in k or ".meta." in k for k in tensors)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    weights = qc["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"], weights["strategy"]) == (4, 32, False, "group")
    assert qc["ignore"] == ["lm_head"]
    card = (out / "README.md").read_text()
    assert "vllm serve path/to/this/output" in card and "folded into input_layernorm" in card


def test_format_is_part_of_the_run_key(tmp_path: Path, capsys) -> None:
    src, _ = _save(tmp_path, "qwen3")
    out = tmp_path / "out"
    run_job(JobOptions(model=str(src), out=str(out), quant=CONFIG), in_process=True)
    capsys.readouterr()
    from jobs import quantize

    assert quantize.main(["--model", str(src), "--out", str(out), "--workers", "1", "--group-size", "32",
                          "--format", "compressed-tensors"]) == 1
    err = capsys.readouterr().err.strip()
    assert "another job (model, config, output format" in err and "--overwrite" in err and "\n" not in err
    manifest = _quantize(src, out, overwrite=True)
    assert manifest["quantization"]["format"] == "compressed-tensors"
    again = _quantize(src, out)  # the same job again: nothing to do
    assert again["run_key"] == manifest["run_key"]


@pytest.mark.parametrize("args, expected", [
    (("--bits", "3"), "bits=3 (supported: 4, 8)"),
    (("--group-size", "48"), "group_size=48 (supported: 32, 64, 128)"),
    (("--bits", "8", "--group-size", "32"), "bits=8 with group_size=32 (asymmetric 8-bit runs on Machete only"),
    (("--tiling", "2D"), "tiling=2D (supported: 1D)"),
    (("--method", "nf4"), "method=nf4 (supported: sinq, asinq, rtn"),
])
def test_unservable_settings_are_refused_before_any_work(tmp_path: Path, capsys, args, expected) -> None:
    src = tmp_path / "nothing-read"
    src.mkdir()
    assert_cli_refuses(src, tmp_path / "out", capsys, "--format compressed-tensors cannot hold", expected,
                       args=("--format", "compressed-tensors", *args))


def test_a_family_without_a_known_fold_keeps_column_scales_of_one(tmp_path: Path, caplog) -> None:
    # StableLM's parallel-residual variants read one norm from both branches: no recipe claims it.
    src, model = _save(tmp_path, "stablelm", classes=(StableLmConfig, StableLmForCausalLM, {}))
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        manifest = _quantize(src, out)
    assert "no exact column-scale fold is known for model_type 'stablelm'" in caplog.text
    assert set(manifest["structure"]["column_scales"].values()) == {"1 (no exact fold for this kind)"}
    ids = torch.randint(0, DIMS["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(ids).logits
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                ones = torch.ones(module.weight.shape[1])
                module.weight.copy_(_deq(module.weight, ones))
        want = model(ids).logits
        got = load_quantized(str(out))(ids).logits
    assert (got - want).abs().max() < 2e-4 * want.abs().max()


def test_rtn_writes_column_scales_of_one_and_leaves_the_norms(tmp_path: Path) -> None:
    src, _ = _save(tmp_path, "qwen3")
    manifest = _quantize(src, tmp_path / "out", quant=QuantConfig(bits=4, group_size=32, method="rtn"))
    assert set(manifest["structure"]["column_scales"].values()) == {"1 (round-to-nearest)"}
    tensors, source = read_dir_tensors(tmp_path / "out"), read_dir_tensors(src)
    assert torch.equal(tensors["model.layers.1.post_attention_layernorm.weight"],
                       source["model.layers.1.post_attention_layernorm.weight"])


@pytest.mark.parametrize("bits", [4, 8])
def test_compressed_tensors_round_trip_keeps_codes_scales_and_zeros(bits: int) -> None:
    from sinq_ops.compressed import from_compressed, to_compressed

    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(bits)) + 0.3  # groups not centred on 0
    config = QuantConfig(bits=bits, group_size=64)
    q = quantize(w, **{**config.to_dict(), "aux": "fp16"}, backend="torch", column_scale=torch.ones(128),
                 zero_in_range=True)
    back = from_compressed(to_compressed(q, torch.float32), config)
    assert torch.equal(back.dequantize(), q.dequantize(apply_scale2=False))
    with pytest.raises(ValueError, match="zero_in_range"):
        to_compressed(quantize(w.abs() + 1, **{**config.to_dict(), "aux": "fp16"}, backend="torch",
                               column_scale=torch.ones(128)), torch.float32)  # all positive: zeros below 0


def test_one_matrix_alone_gets_the_column_scale_sinq_gives_it() -> None:
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(3)) * torch.linspace(0.2, 3, 256)
    mine = quantize(w, bits=4, group_size=64, aux="fp16").scale2.float().reshape(-1)
    assert torch.allclose(shared_column_scale([w], 64).half().float(), mine)


def test_a_fused_group_quantized_in_part_is_refused(tmp_path: Path, capsys) -> None:
    src, _ = _save(tmp_path, "qwen3")
    capsys.readouterr()
    assert_cli_refuses(src, tmp_path / "out", capsys, "self_attn.v_proj would stay unquantized",
                       "q_proj/k_proj/v_proj", args=("--format", "compressed-tensors", "--group-size", "32",
                                                     "--exclude", r"layers\.1\.self_attn\.v_proj"))


def test_codes_are_chosen_for_the_scale_as_stored() -> None:
    """With bfloat16 scales, the codes are the nearest for the rounded scale a loader reads."""
    from sinq_ops.compressed import from_compressed, to_compressed

    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(5))
    config = QuantConfig(bits=8, group_size=64)
    common = dict(**{**config.to_dict(), "aux": "fp16"}, backend="torch", column_scale=torch.ones(256), zero_in_range=True)
    aware = quantize(w, **common, scale_dtype=torch.bfloat16)
    stored = from_compressed(to_compressed(aware, torch.bfloat16), config).dequantize()
    assert torch.equal(stored, aware.dequantize(apply_scale2=False))
    naive = from_compressed(to_compressed(quantize(w, **common), torch.bfloat16), config).dequantize()
    assert (w - stored).norm() < (w - naive).norm()


def test_an_interrupted_job_resumes_from_its_staged_layers(tmp_path: Path) -> None:
    """Layers staged by an interrupted compressed-tensors job are reused by its rerun, which writes the
    bytes an uninterrupted job writes."""
    src, _ = _save(tmp_path, "qwen3")
    clean = tmp_path / "clean"
    _quantize(src, clean)
    out = tmp_path / "out"
    opts = JobOptions(model=str(src), out=str(out), quant=CONFIG, output_format="compressed-tensors")
    plan = make_plan(open_source(str(src)), CONFIG, output_format="compressed-tensors")
    staging = Location(str(out / ".staging" / run_key(plan.source, opts)))
    layers = [u for u in plan.units if u.folds is not None]
    for unit in layers:
        assert not process_unit(plan.source, unit, plan.config, staging, "cpu").reused
    manifest = run_job(opts, in_process=True, log=lambda _: None)
    assert manifest["timings"]["units_reused"] == len(layers) > 0
    assert file_bytes(out) == file_bytes(clean)
