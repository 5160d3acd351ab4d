"""synthetic:// sources: whole-model-shaped jobs without the model's bytes on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.job.plan import make_plan
from pipeline.job.options import JobOptions
from pipeline.job.run import run_job
from pipeline.sources import SourceError, open_source
from pipeline.sources.synthetic import decoder_matrices
from pipeline_checks import file_bytes, read_dir_tensors
from sinq_ops import QuantConfig, quantize
from sinq_ops.config import KURTOSIS_GATE
from sinq_ops.sinkhorn import kurtosis


pytestmark = pytest.mark.usefixtures("local_ray")


def test_llama_70b_plans_at_full_scale_without_generating_data() -> None:
    plan = make_plan(open_source("synthetic://llama-70b"), QuantConfig())
    assert sum(u.name.startswith("model.layers.") for u in plan.units) == 80
    assert len(plan.quantized) == 80 * 7
    assert 140e9 < plan.in_bytes < 142e9  # 70.6B parameters in bf16
    layer = next(u for u in plan.units if u.name == "model.layers.0")
    assert {t.shape for t in layer.tasks if t.quantize} == {(8192, 8192), (1024, 8192), (28672, 8192), (8192, 28672)}
    assert 4 * (plan.gpu_memory_bytes() + 0.5e9) < 24e9  # four GPU workers, CUDA contexts included, fit a 24 GB card
    # The benches' per-layer table (grouped shapes) describes the same layer the source generates.
    matrices = decoder_matrices("llama-70b")
    assert sorted(t.shape for t in layer.tasks if t.quantize) == sorted(
        (n, k) for _, n, k, count in matrices for _ in range(count))
    assert [name for name, *_ in matrices] == ["q/o_proj", "k/v_proj", "gate/up_proj", "down_proj"]


def test_full_size_mixtures_of_experts_plan_in_units_that_fit_a_worker() -> None:
    deepseek = make_plan(open_source("synthetic://deepseek-v3"), QuantConfig())
    assert 1.33e12 < deepseek.in_bytes < 1.35e12  # 671B parameters in bf16 (the router in float32)
    assert deepseek.worker_memory == 12 * 10**9
    layer = [u for u in deepseek.units if u.block == "model.layers.10"]
    assert len(layer) == 3 and all(u.memory_bytes() <= deepseek.worker_memory for u in layer)
    assert max(u.memory_bytes() for u in deepseek.units) <= deepseek.worker_memory
    experts = [t for u in layer for t in u.tasks if t.expert is not None]
    assert len(experts) == 256 * 2 and {t.shape for t in experts} == {(4096, 7168), (7168, 2048)}
    assert {t.leaf for t in experts} == {f"model.layers.10.mlp.experts.{p}.{e}" for e in range(256)
                                        for p in ("gate_up_proj", "down_proj")}
    kept = {t.name: t.dtype for u in layer for t in u.tasks if not t.quantize}
    assert kept["model.layers.10.mlp.gate.weight"] == "F32" and "model.layers.10.mlp.gate.e_score_correction_bias" in kept
    assert deepseek.quantized_share > 0.99

    qwen = make_plan(open_source("synthetic://qwen3-235b-a22b"), QuantConfig())
    assert 4.6e11 < qwen.in_bytes < 4.8e11 and sum(u.block.startswith("model.layers.") for u in qwen.units) == 94
    assert len(qwen.quantized) == 94 * (4 + 2 * 128)
    small = open_source("synthetic://qwen3-30b-a3b?layers=2")
    name = "model.layers.1.mlp.experts.127.down_proj.weight"
    assert small.header("layer-00001")[name].shape == (2048, 768)


def test_tiny_synthetic_job_is_deterministic_and_quantizes_the_generated_weights(tmp_path: Path) -> None:
    spec = "synthetic://tiny?layers=3&seed=7&dtype=bf16"
    m1 = run_job(JobOptions(model=spec, out=str(tmp_path / "a"), workers=2, max_shard_size=300_000), log=lambda _: None)
    run_job(JobOptions(model=spec, out=str(tmp_path / "b"), workers=1, max_shard_size=300_000), log=lambda _: None)
    assert file_bytes(tmp_path / "a") == file_bytes(tmp_path / "b")
    assert m1["source"]["synthetic"] == "tiny" and m1["source"]["seed"] == 7
    src = open_source(spec)
    name = "model.layers.2.mlp.down_proj.weight"
    w = src.read_tensor("layer-00002", src.header("layer-00002")[name])
    assert w.dtype == torch.bfloat16 and w.shape == (256, 512)
    assert torch.unique(w, dim=0).shape[0] == 256 and kurtosis(w) < KURTOSIS_GATE  # distinct rows, Sinkhorn applies
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = quantize(w).to_state_dict("model.layers.2.mlp.down_proj")
    finally:
        torch.set_num_threads(threads)
    out = read_dir_tensors(tmp_path / "a")
    assert all(torch.equal(out[k], v) for k, v in expected.items())
    other = open_source("synthetic://tiny?layers=3&seed=8")
    assert not torch.equal(other.read_tensor("layer-00002", other.header("layer-00002")[name]), w)


@pytest.mark.parametrize(("spec", "message"), [
    ("synthetic://gpt-9", "unknown synthetic model 'gpt-9'"),
    ("synthetic://tiny?layers=x", "must be integers"),
    ("synthetic://tiny?depth=3", "unknown parameter 'depth'"),
    ("synthetic://tiny?dtype=int8", "dtype one of"),
])
def test_bad_synthetic_specs(spec: str, message: str) -> None:
    with pytest.raises(SourceError, match=message):
        open_source(spec)
