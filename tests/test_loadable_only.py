"""A job commits only what loads and computes what the source does: checkpoints that hold tensors the
model has no place for or of the wrong shape, miss a parameter or an expert, or are quantized in a
format this tool does not read are refused before
any work, in one line, with nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from checkpoints import write_llama_checkpoint
from jobs import quantize as cli
from pipeline.output.manifest import MANIFEST_NAME


def _saved(model: torch.nn.Module, out: Path) -> Path:
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return write_llama_checkpoint(tmp_path_factory.mktemp("llama") / "m", layers=1, hidden=64, intermediate=128,
                                  vocab=64, shards=1, seed=3)


def _refused(src: Path, out: Path, capsys, *pieces: str) -> str:
    capsys.readouterr()  # what writing the source printed
    assert cli.main(["--model", str(src), "--out", str(out), "--workers", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for piece in pieces:
        assert piece in err, (piece, err)
    assert not out.exists() or not (out / MANIFEST_NAME).exists()
    return err


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, num_experts=4,
                         num_experts_per_tok=2, head_dim=32)
    return _saved(Qwen3MoeForCausalLM(cfg), tmp_path_factory.mktemp("moe") / "m")


def test_a_mixture_of_experts_missing_an_expert_is_refused(moe: Path, tmp_path: Path, capsys) -> None:
    src = tmp_path / "src"
    shutil.copytree(moe, src)
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.0.mlp.experts.2.up_proj.weight"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    _refused(src, tmp_path / "out", capsys, "no tensor for expert 2 of model.layers.0.mlp.experts.gate_up_proj",
             "would not load")


def test_a_tensor_of_the_wrong_shape_is_refused(moe: Path, tmp_path: Path, capsys) -> None:
    src = tmp_path / "src"
    shutil.copytree(moe, src)
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.0.mlp.experts.1.down_proj.weight"] = torch.zeros(64, 32)
    tensors["model.layers.0.mlp.gate.weight"] = torch.zeros(4, 32)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    _refused(src, tmp_path / "out", capsys, "'model.layers.0.mlp.experts.1.down_proj.weight' of shape [64, 32]",
             "into model.layers.0.mlp.experts.down_proj")


def test_a_tensor_without_a_place_in_the_model_is_refused(llama: Path, tmp_path: Path, capsys) -> None:
    src = tmp_path / "src"
    shutil.copytree(llama, src)
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight_scale_inv"] = torch.ones(1, 1)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    _refused(src, tmp_path / "out", capsys, "model.safetensors", "'model.layers.0.mlp.up_proj.weight_scale_inv'",
             "has no place in LlamaForCausalLM")


def test_a_parameter_without_a_tensor_is_refused(llama: Path, tmp_path: Path, capsys) -> None:
    src = tmp_path / "src"
    shutil.copytree(llama, src)
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.0.post_attention_layernorm.weight"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    _refused(src, tmp_path / "out", capsys, "no tensor for model.layers.0.post_attention_layernorm.weight")


def test_an_already_quantized_source_is_refused_naming_its_format(llama: Path, tmp_path: Path, capsys) -> None:
    src = tmp_path / "src"
    shutil.copytree(llama, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (src / "config.json").write_text(json.dumps(cfg))
    _refused(src, tmp_path / "out", capsys, "config.json", "already quantized (gptq)")


def test_a_planted_output_tensor_with_no_place_fails_the_job_before_its_manifest(
        llama: Path, tmp_path: Path, monkeypatch, capsys, local_ray) -> None:
    from pipeline.job import run as run_module
    from pipeline.job.plan import Unit, _generated

    real = run_module.make_plan

    def planted(*args, **kwargs):  # a planning mistake: a tensor the model has no place for
        plan = real(*args, **kwargs)
        first = plan.units[0]
        plan.units[0] = Unit(first.index, first.name, first.tasks + (_generated("model.stray", torch.ones(2)),),
                             first.block)
        return plan

    monkeypatch.setattr(run_module, "make_plan", planted)
    out = tmp_path / "out"
    _refused(llama, out, capsys, "would not load, so it is not committed: output tensor 'model.stray' has no place")
    assert not (out / "model.safetensors.index.json").exists()
