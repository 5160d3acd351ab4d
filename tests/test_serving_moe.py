"""``--format compressed-tensors`` for mixtures of experts: every expert written as the checkpoint's own
per-expert tensors (the names serving engines load experts by), its down projection's column scale
folded into its up rows, and one column scale for every expert's and the shared expert's gate/up,
folded into the post-attention norm with the router's columns divided by it.

The oracle is the same SINQ applied in memory to the float model, nothing folded (as in
``test_serving_format``); the output, loaded by ``load_quantized`` from its per-expert tensors
stacked back, must compute the same logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

import moe_models
from pipeline.job.reduce import model_leaves
from pipeline.job.plan import make_plan
from pipeline.loader import load_quantized
from pipeline.output.layout import SIDECAR_NAME
from pipeline.sources import open_source
from pipeline_checks import assert_cli_refuses, read_dir_tensors
from sinq_ops import QuantConfig
from sinq_ops.columns import shared_column_scale
from test_serving_format import CONFIG, FAMILIES, G, _deq, _quantize, attention_served, mlp_served


def _qwen2_moe(out: Path) -> tuple[Path, torch.nn.Module]:
    """Qwen 2's mixture: a shared expert beside the routed ones, with a sigmoid gate of its own."""
    torch.manual_seed(0)
    cfg = Qwen2MoeConfig(vocab_size=96, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                         shared_expert_intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, num_experts=4, num_experts_per_tok=2, max_position_embeddings=128)
    model = Qwen2MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # norms that are not all ones, so that a fold shows
                p.copy_(1 + 0.2 * torch.randn_like(p))
    model.save_pretrained(out)
    return out, model


def _experts_served(mlp: torch.nn.Module, scale_dtype: torch.dtype) -> torch.Tensor:
    """A mixture's experts (and shared expert) replaced in memory: each down's own scale carried by its
    up rows, one scale from every up row for all gate/up rows. Returns that scale."""
    experts = mlp.experts
    gate_up, down = experts.gate_up_proj, experts.down_proj  # [E, 2I, H], [E, H, I]
    inter = down.shape[-1]
    shared = getattr(mlp, "shared_expert", None)
    ups = [gate_up[e][inter:] for e in range(gate_up.shape[0])] + ([shared.up_proj.weight] if shared else [])
    scale = shared_column_scale(ups, G)
    for e in range(gate_up.shape[0]):
        s_d = shared_column_scale([down[e]], G)
        rows = gate_up[e].clone()
        rows[inter:] *= s_d[:, None]
        made = _deq(rows, scale, scale_dtype)
        made[inter:] /= s_d[:, None]
        gate_up[e].copy_(made)
        down[e].copy_(_deq(down[e], s_d, scale_dtype))
    if shared is not None:
        mlp_served(shared, scale_dtype, scale)
    return scale


def _logits_match(src_model: torch.nn.Module, out: Path, want_model: torch.nn.Module) -> None:
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        float_logits = src_model(ids).logits
        want = want_model(ids).logits
        got = load_quantized(str(out))(ids).logits
    assert (got - want).abs().max() < 2e-4 * want.abs().max(), (got - want).abs().max()
    assert (want - float_logits).abs().max() > 1e-3  # it is quantized


def test_qwen2_moe_experts_shared_expert_and_router_fold(tmp_path: Path) -> None:
    src, model = _qwen2_moe(tmp_path / "src")
    out = tmp_path / "out"
    manifest = _quantize(src, out)
    tensors = read_dir_tensors(out)
    # the checkpoint's per-expert names, as serving engines load them; no stacked parameter
    expert = "model.layers.1.mlp.experts.3"
    for proj in ("gate_proj", "up_proj", "down_proj"):
        assert {k for k in tensors if k.startswith(f"{expert}.{proj}.")} == {f"{expert}.{proj}.weight_{s}" for s in
                                                                          ("packed", "scale", "zero_point", "shape")}
    assert tensors[f"{expert}.up_proj.weight_shape"].tolist() == [64, 64]
    assert not [k for k in tensors if "gate_up_proj" in k]
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {"model.layers.0.mlp.gate", "model.layers.0.mlp.shared_expert_gate"} <= set(config["ignore"])
    placed = manifest["structure"]["column_scales"]
    assert placed["mlp.experts.down_proj"] == "folded into mlp.experts.gate_up_proj (its up rows) rows"
    assert placed["mlp.experts.gate_up_proj"].startswith("mlp.experts.gate_up_proj up rows and mlp.shared_expert.up_proj's")
    assert "mlp.gate divided by it" in placed["mlp.shared_expert.gate_proj"]
    card = (out / "README.md").read_text()
    assert "per-expert names" in card and "transformers reads it too" not in card

    source = read_dir_tensors(src)
    want = _qwen2_moe(tmp_path / "again")[1]
    with torch.no_grad():
        scales = []
        for layer in want.model.layers:
            attention_served(layer.self_attn, want.config, torch.float32)
            scales.append(_experts_served(layer.mlp, torch.float32))
    # the router reads the scaled input: its columns were divided by the scale the norm took
    router = "model.layers.0.mlp.gate.weight"
    assert torch.allclose(tensors[router], source[router] / scales[0], rtol=1e-6)
    _logits_match(model, out, want)


def test_qwen3_moe_output_computes_the_in_memory_quantization(tmp_path: Path) -> None:
    src = moe_models.save("qwen3_moe", tmp_path / "src")
    out = tmp_path / "out"
    _quantize(src, out)
    model, want = moe_models.build("qwen3_moe"), moe_models.build("qwen3_moe")
    with torch.no_grad():
        for layer in want.model.layers:
            attention_served(layer.self_attn, want.config, torch.float32)
            _experts_served(layer.mlp, torch.float32)
    _logits_match(model, out, want)
    # a block whose entry says other rows than it holds is refused, not stacked in the wrong place
    sidecar = json.loads((out / SIDECAR_NAME).read_text())
    sidecar["model.layers.0.mlp.experts.1.up_proj"]["meta"]["rows"] = [0, 64]
    (out / SIDECAR_NAME).write_text(json.dumps(sidecar))
    with pytest.raises(ValueError, match="experts.gate_up_proj.1: its block .* does not continue"):
        load_quantized(str(out), require_manifest=False)


def test_a_family_without_a_recipe_writes_its_experts_with_column_scales_of_one(tmp_path: Path) -> None:
    # Qwen3-Next's linear-attention layers have no fold recipe: every matrix, experts too, takes ones.
    src = moe_models.save("qwen3_next", tmp_path / "src")
    out = tmp_path / "out"
    manifest = _quantize(src, out)
    tensors = read_dir_tensors(out)
    expert = "model.layers.0.mlp.experts.2"
    assert {k.rsplit(".", 1)[0] for k in tensors if k.startswith(expert)} == {f"{expert}.{w}" for w in
                                                                            ("gate_proj", "up_proj", "down_proj")}
    assert set(manifest["structure"]["column_scales"].values()) == {"1 (no exact fold for this kind)"}
    sidecar = json.loads((out / SIDECAR_NAME).read_text())
    model, want = moe_models.build("qwen3_next"), moe_models.build("qwen3_next")
    with torch.no_grad():
        for leaf in model_leaves((k, v["meta"]) for k, v in sidecar.items()):
            param, _, number = leaf.rpartition(".")
            m = want.get_parameter(param)[int(number)] if number.isdigit() else want.get_parameter(f"{leaf}.weight")
            m.copy_(_deq(m, torch.ones(m.shape[1]), torch.float32))
    _logits_match(model, out, want)


def test_experts_the_checkpoint_names_outside_the_models_module_are_refused(tmp_path: Path, capsys) -> None:
    # Mixtral's checkpoint holds its experts in block_sparse_moe, transformers' model in mlp: an output
    # naming its experts one way and its router the other would load nowhere.
    src = moe_models.save("mixtral", tmp_path / "src")
    capsys.readouterr()
    assert_cli_refuses(src, tmp_path / "out", capsys, "block_sparse_moe", "outside the model's", "--format sinq",
                       args=("--format", "compressed-tensors", "--group-size", str(CONFIG.group_size)))


def test_experts_stacked_in_the_checkpoint_are_refused_in_one_line(tmp_path: Path, capsys) -> None:
    src = moe_models.save("qwen3_moe", tmp_path / "src", fused=True)
    capsys.readouterr()
    assert_cli_refuses(src, tmp_path / "out", capsys, "the checkpoint stores", "stacked", "--format sinq",
                       args=("--format", "compressed-tensors", "--group-size", str(CONFIG.group_size)))


def test_every_family_with_a_fold_recipe_is_checked() -> None:
    from pipeline.job.folds import RECIPES

    # dense families in test_serving_format, the two mixtures above
    assert set(RECIPES) <= set(FAMILIES) | {"qwen2_moe", "qwen3_moe"}


def test_a_mixture_layer_is_planned_whole_with_the_memory_its_shared_scale_takes(tmp_path: Path) -> None:
    src, _ = _qwen2_moe(tmp_path / "src")
    plan = make_plan(open_source(str(src)), CONFIG, output_format="compressed-tensors", worker_memory=2 * 10**5)
    layer = next(u for u in plan.units if u.block == "model.layers.0")
    assert len([u for u in plan.units if u.block == "model.layers.0"]) == 1  # never split: one gate/up scale
    # Sinkhorn over every expert's up rows and the shared expert's: 4 x 64 + 64 rows of 64 columns
    assert layer.lead_numel == (4 * 64 + 64) * 64
    assert layer.memory_bytes() - layer.memory_bytes(gpu=True) >= 16 * layer.lead_numel
    assert plan.gpu_memory_bytes() > 16 * layer.lead_numel
    rtn = make_plan(open_source(str(src)), QuantConfig(bits=4, group_size=32, method="rtn"),
                    output_format="compressed-tensors", worker_memory=2 * 10**5)
    assert len([u for u in rtn.units if u.block == "model.layers.0"]) > 1  # nothing shared: split by experts
