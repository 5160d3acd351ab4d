"""Mixtures of experts end to end: every expert matrix quantized as a weight of its own, routers and
gates kept byte for byte, the output loaded into transformers' own MoE classes, and its logits equal
to the same model quantized in memory; layers larger than a worker's memory split into units by
groups of experts without changing a byte of the output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import moe_models
from pipeline.architecture import expert_modules, experts_transposed
from pipeline.job.options import JobOptions
from pipeline.job.plan import Unit, make_plan
from pipeline.job.run import run_job
from pipeline.loader import load_quantized, load_source
from pipeline.output.layout import SIDECAR_NAME
from pipeline.sources import open_source
from pipeline_checks import file_bytes, read_dir_tensors
from sinq_ops import QuantConfig, SINQExperts, quantize

pytestmark = pytest.mark.usefixtures("local_ray")

CONFIG = QuantConfig(group_size=32)
# Routers and gates: kept exactly as in the source, whatever module holds them.
GATES = ("mlp.gate.", "feed_forward.router.", "mlp.router.", "shared_expert_gate.", "block_sparse_moe.gate.")


def _job(src: Path, out: Path, *, in_process: bool = False, **settings) -> dict:
    """The job on the module's Ray, or ``in_process`` where what is tested is the model, not the cluster."""
    opts = JobOptions.from_settings({"model": str(src), "out": str(out), "group_size": CONFIG.group_size,
                                     "workers": 2, **settings})
    return run_job(opts, log=lambda _: None, in_process=in_process)


def _in_memory(src: Path, leaves: list[str]) -> torch.nn.Module:
    """The float model with each matrix the output quantized replaced, in memory, by its
    quantize-dequantize round trip: what the output must compute."""
    model = load_source(str(src))
    experts = expert_modules(model)
    with torch.no_grad():
        for leaf in leaves:
            param, _, number = leaf.rpartition(".")
            if number.isdigit():
                module_name, _, attr = param.rpartition(".")
                stored = getattr(experts[module_name], attr)
                transposed = experts_transposed(experts[module_name])
                w = stored[int(number)]
                q = quantize(w.t().contiguous() if transposed else w, **CONFIG.to_dict()).dequantize(torch.float32)
                stored[int(number)] = q.t() if transposed else q
            else:
                linear = model.get_submodule(leaf)
                linear.weight.copy_(quantize(linear.weight.detach().clone(), **CONFIG.to_dict()).dequantize(torch.float32))
    return model


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, moe_models.V, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", sorted(moe_models.configs()))
def test_family_quantizes_loads_and_computes_the_in_memory_quantized_model(family: str, tmp_path: Path) -> None:
    src = moe_models.save(family, tmp_path / "src")
    manifest = _job(src, tmp_path / "out", in_process=True)
    out = tmp_path / "out"
    leaves = sorted(json.loads((out / SIDECAR_NAME).read_text()))

    # The float reference is read by this project's load_source: first, it computes what the model
    # transformers built and saved computes, so a misread source cannot hide in both sides below.
    original = _logits(moe_models.build(family))
    assert torch.allclose(_logits(load_source(str(src))), original, rtol=1e-5, atol=1e-5)

    loaded = load_quantized(str(out))
    assert any(isinstance(m, SINQExperts) for m in loaded.modules()), "no experts module stayed quantized"
    want = _logits(_in_memory(src, leaves))
    got = _logits(loaded)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got - want).abs().max()
    # ... and it is a quantized model, not the float one.
    assert (got - _logits(load_source(str(src)))).abs().max() > 1e-3

    source, output = read_dir_tensors(src), read_dir_tensors(out)
    gates = [n for n in source if any(g in n for g in GATES)]
    assert gates
    for name in gates:  # same bytes, under the model's name for it (Mixtral's block_sparse_moe is mlp)
        kept = output[name.replace("block_sparse_moe.", "mlp.")]
        assert kept.dtype == source[name].dtype and torch.equal(kept, source[name]), name

    # At least 95% of the parameters of attention and expert matrices are quantized.
    kinds = {k["kind"]: k for k in manifest["structure"]["kinds"]}
    expert_kind = next(k for k in kinds if k.endswith("Experts"))
    matrices = [kinds[expert_kind], kinds["Linear"]]
    quantized = sum(k["quantized_params"] for k in matrices)
    lm_head = moe_models.V * moe_models.H
    assert quantized / (quantized + sum(k["kept_params"] for k in matrices) - lm_head) >= 0.95
    assert kinds[expert_kind]["quantized_matrices"] == sum(1 for leaf in leaves if leaf.rpartition(".")[2].isdigit())
    assert all(k["quantized_params"] == 0 for name, k in kinds.items() if "Router" in name)
    # Plain from_pretrained cannot build quantized experts: it is refused, and the card says what loads it.
    assert "quant_method" not in json.loads((out / "config.json").read_text())["quantization_config"]
    assert "SINQExperts" in (out / "README.md").read_text()


def test_dry_run_shows_per_kind_of_module_what_is_quantized_and_kept(tmp_path: Path, capsys) -> None:
    from jobs import quantize as cli

    src = moe_models.save("qwen3_next", tmp_path / "src")
    capsys.readouterr()
    assert cli.main(["--model", str(src), "--group-size", "32", "--dry-run"]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert rows["Qwen3NextExperts"][:1] == ["16"]  # 2 layers x 4 experts x (gate_up, down)
    assert rows["Qwen3NextTopKRouter"][:2] == ["0", "0"] and rows["Qwen3NextGatedDeltaNet"][:2] == ["0", "0"]
    assert rows["Linear"][2] == "3"  # lm_head and the two shared_expert_gate weights, kept
    assert "% of all parameters quantized" in " ".join(rows["tensors"])


def test_both_expert_layouts_give_the_same_output(tmp_path: Path) -> None:
    per_expert = moe_models.save("qwen3_moe", tmp_path / "hub", seed=3)
    fused = moe_models.save("qwen3_moe", tmp_path / "fused", fused=True, seed=3)
    assert any(".experts.0.gate_proj." in n for n in read_dir_tensors(per_expert))
    assert any(n.endswith(".experts.gate_up_proj") for n in read_dir_tensors(fused))
    _job(per_expert, tmp_path / "a", in_process=True)
    _job(fused, tmp_path / "b", in_process=True)
    a, b = file_bytes(tmp_path / "a"), file_bytes(tmp_path / "b")
    shards = [n for n in a if n.endswith(".safetensors")]
    assert shards and all(a[n] == b[n] for n in shards)


def test_a_small_worker_memory_splits_layers_by_experts_and_changes_no_byte(tmp_path: Path) -> None:
    src = moe_models.save("deepseek_v3", tmp_path / "src", seed=1)
    whole = make_plan(open_source(str(src)), CONFIG)
    layer = next(u for u in whole.units if u.name == "model.layers.1")
    first_group = tuple(t for t in layer.tasks if t.expert in (None, 0, 1))  # the layer's other tensors, two experts
    budget = max([u.memory_bytes() for u in whole.units if u is not layer] + [Unit(0, "", first_group).memory_bytes()])
    assert budget < layer.memory_bytes()
    split = make_plan(open_source(str(src)), CONFIG, worker_memory=budget)
    parts = [u for u in split.units if u.block == "model.layers.1"]
    assert len(parts) >= 2 and all(u.memory_bytes() <= budget for u in parts)
    assert sorted(t.leaf for u in parts for t in u.tasks) == sorted(t.leaf for t in layer.tasks)

    _job(src, tmp_path / "whole", workers=1)
    _job(src, tmp_path / "split", workers=2, worker_memory=budget)
    assert file_bytes(tmp_path / "whole") == file_bytes(tmp_path / "split")


def test_routers_are_kept_wherever_the_router_module_sits() -> None:
    import transformers as tf

    from pipeline.architecture import model_layout

    # Gemma 4: router (holding a Linear) and experts directly in the decoder layer, no MoE block.
    gemma4 = tf.Gemma4TextConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=32, enable_moe_block=True,
                                 num_experts=4, top_k_experts=2, moe_intermediate_size=64).to_dict()
    layout = model_layout({**gemma4, "architectures": ["Gemma4ForCausalLM"]})
    assert layout.expert_weights and not any("router" in n for n in layout.linear_weights)
    assert any(".self_attn.q_proj." in n for n in layout.linear_weights)
    # DBRX: a Linear inside its DbrxRouter.
    dbrx = tf.DbrxConfig(d_model=64, n_heads=2, n_layers=1, max_seq_len=64, vocab_size=96,
                         attn_config={"kv_n_heads": 1, "rope_theta": 10000.0},
                         ffn_config={"ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 2}).to_dict()
    layout = model_layout({**dbrx, "architectures": ["DbrxForCausalLM"]})
    assert not any("router" in n for n in layout.linear_weights) and any("Wqkv" in n for n in layout.linear_weights)


def test_tensors_transformers_drops_on_load_are_skipped_and_said(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    src = moe_models.save("deepseek_v3", tmp_path / "src")
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.61.eh_proj.weight"] = torch.zeros(64, 128)  # DeepSeek-V3's multi-token-prediction layer
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    plan = make_plan(open_source(str(src)), CONFIG)
    assert not any(".layers.61." in o.name for u in plan.units for o in u.outputs)
    assert any("skipped       1 tensors" in n and "model.layers.61.eh_proj.weight" in n for n in plan.notes)
