"""The ways a 2025-26 release failed, each on the tiny family that showed it, in-process (no Ray).

- A model that reads a Linear's weight outside that Linear's forward (Jamba's Mamba mixer multiplies
  by ``dt_proj.weight``): the output computes with the quantized weight; and, with the quantized
  Linear's ``weight`` taken away, the commit check fails the job instead of committing an output
  whose forward raises.
- config.json as transformers 5 writes it, with ``{"__float__": "Infinity"}`` for infinite floats.
- ``nn.Linear`` subclasses whose forward is the linear map (Falcon's ``FalconLinear``) are quantized.
- A matrix too small for the group size (Gemma 3n's AltUp coefficients) is kept in full precision and
  said in the plan, the manifest and the card; a large one is still refused.
- Checkpoint conversions beyond stacking experts (Qwen3-VL-MoE's transposed experts) still split a
  layer into units by experts, with the same bytes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import families
from family_sweep import GROUP_SIZE, in_memory
from pipeline.job.options import JobOptions
from pipeline.job.plan import make_plan
from pipeline.job.reduce import UnloadableOutput
from pipeline.job.run import run_job
from pipeline.loader import load_quantized, load_source
from pipeline.output.layout import CARD_NAME, SIDECAR_NAME
from pipeline.output.manifest import MANIFEST_NAME
from pipeline.sources import open_source
from pipeline_checks import file_bytes
from sinq_ops import QuantConfig, SINQLinear

CONFIG = QuantConfig(group_size=GROUP_SIZE)


def _job(src: Path, out: Path, **settings) -> dict:
    opts = JobOptions.from_settings({"model": str(src), "out": str(out), "group_size": GROUP_SIZE, **settings})
    return run_job(opts, log=lambda _: None, in_process=True)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(3, 200, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.fixture(scope="module")
def jamba(tmp_path_factory) -> Path:
    return families.save("jamba", tmp_path_factory.mktemp("jamba") / "src")


def test_a_model_reading_a_quantized_linears_weight_computes_with_it(jamba: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    manifest = _job(jamba, out)
    assert manifest["structure"]["forward_check"] == "fake tensors"
    leaves = sorted(json.loads((out / SIDECAR_NAME).read_text()))
    assert any(leaf.endswith("mamba.dt_proj") for leaf in leaves), "the Mamba mixer's dt_proj is quantized"
    got = _logits(load_quantized(str(out)))
    want = _logits(in_memory(load_source(str(jamba)), leaves, CONFIG))
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got - want).abs().max()


def test_the_commit_check_fails_a_job_whose_output_cannot_run_its_forward(
        jamba: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delattr(SINQLinear, "weight")  # the quantized Linear as it was: no weight to read
    out = tmp_path / "out"
    with pytest.raises(UnloadableOutput) as caught:
        _job(jamba, out)
    message = str(caught.value)
    assert "\n" not in message and "forward pass fails in model.layers." in message and "mamba" in message, message
    assert "'weight'" in message, message
    assert not (out / MANIFEST_NAME).exists() and not (out / "model.safetensors.index.json").exists()


def test_a_config_with_infinite_floats_is_read_as_transformers_reads_it(tmp_path: Path) -> None:
    src = families.save("nemotron_h", tmp_path / "src")
    assert "__float__" in (src / "config.json").read_text()  # transformers 5 writes infinity this way
    manifest = _job(src, tmp_path / "out")
    assert manifest["totals"]["tensors_quantized"] > 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["time_step_limit"] == \
        json.loads((src / "config.json").read_text())["time_step_limit"]  # written back as it was read


def test_linear_subclasses_computing_the_linear_map_are_quantized(tmp_path: Path) -> None:
    src = families.save("falcon", tmp_path / "src")
    plan = make_plan(open_source(str(src)), CONFIG)
    kinds = {k.kind: k for k in plan.kinds}
    assert kinds["FalconLinear"].quantized_matrices == len(plan.quantized) > 0


def test_a_matrix_too_small_for_the_group_size_is_kept_and_said(tmp_path: Path) -> None:
    src = families.save("gemma3n_text", tmp_path / "src")
    plan = make_plan(open_source(str(src)), CONFIG)
    small = [k for k in plan.kinds if k.kept_undivided]
    assert small and any("kept small" in note and "correction_coefs" in note for note in plan.notes), plan.notes
    assert "small" in plan.describe().splitlines()[11]
    out = tmp_path / "out"
    manifest = _job(src, out)
    kept = {k["kind"]: k["kept_undivided"] for k in manifest["structure"]["kinds"] if k["kept_undivided"]}
    assert kept == {k.kind: k.kept_undivided for k in small}
    assert "kept in full precision" in (out / CARD_NAME).read_text()
    leaves = sorted(json.loads((out / SIDECAR_NAME).read_text()))
    assert not any("correction_coefs" in leaf for leaf in leaves)
    got = _logits(load_quantized(str(out)))
    want = _logits(in_memory(load_source(str(src)), leaves, CONFIG))
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got - want).abs().max()


def test_a_large_matrix_the_group_size_does_not_divide_is_still_refused(tmp_path: Path) -> None:
    src = families.save("llama", tmp_path / "src")
    with pytest.raises(ValueError, match=r"in_features=128, not divisible by group size 96.*--exclude"):
        make_plan(open_source(str(src)), QuantConfig(group_size=96))


def test_converted_experts_split_into_units_write_the_same_bytes(tmp_path: Path) -> None:
    src = families.save("qwen3_vl_moe", tmp_path / "src")
    plan = make_plan(open_source(str(src)), CONFIG)
    experts = [t for t in plan.quantized if t.expert is not None]
    assert experts and all(t.conversion is not None and t.conversion.expert == t.expert for t in experts), \
        "each expert is converted (transposed) from its own slice"
    whole, split = tmp_path / "whole", tmp_path / "split"
    _job(src, whole)
    layer = max(u.memory_bytes() for u in plan.units if any(t.expert is not None for t in u.tasks))
    manifest = _job(src, split, worker_memory=math.ceil(layer * 0.6))
    assert len(manifest["units"]) > len(plan.units), "a layer was split by experts"
    assert file_bytes(split) == file_bytes(whole)
