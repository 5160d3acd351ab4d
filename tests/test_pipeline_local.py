"""The quantize job end to end on a real local Ray instance, local disk in and out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import write_llama_checkpoint
from pipeline.output.manifest import MANIFEST_NAME, verify
from pipeline.job.plan import PlanError
from pipeline.job.options import JobOptions
from pipeline.job.run import JobError, run_job
from pipeline.io.storage import Location
from pipeline_checks import assert_output_matches_source, file_bytes
from sinq_ops import QuantConfig

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("local_ray")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_llama_checkpoint(tmp_path_factory.mktemp("src") / "tiny-llama", layers=3, hidden=128,
                                  intermediate=256, vocab=256, shards=2, seed=1)


def _opts(model: Path | str, out: Path | str, **settings) -> JobOptions:
    """Options from flat settings, as a settings file gives them (``bits=3``, ``workers=2``, ...)."""
    return JobOptions.from_settings({"model": str(model), "out": str(out), "max_shard_size": 200_000, **settings})


def test_output_equals_sinq_ops_and_verifies(checkpoint: Path, tmp_path: Path) -> None:
    manifest = run_job(_opts(checkpoint, tmp_path / "out", workers=2), log=lambda _: None)
    out = tmp_path / "out"
    assert verify(Location(str(out)))["totals"] == manifest["totals"]
    assert manifest["totals"]["shards"] >= 2 and len(list(out.glob("model-*-of-*.safetensors"))) == manifest["totals"]["shards"]
    assert_output_matches_source(out, checkpoint, QuantConfig())
    assert (out / "generation_config.json").read_bytes() == (checkpoint / "generation_config.json").read_bytes()
    assert not (out / ".staging").exists()
    stats = manifest["tensors"]
    assert len(stats) == 3 * 7 and all(0 < s["rel_error"] < 0.2 for s in stats)
    assert manifest["source"]["files"].keys() >= {"config.json", "model-00001-of-00002.safetensors"}


def test_one_and_two_workers_write_identical_bytes(checkpoint: Path, tmp_path: Path) -> None:
    one = tmp_path / "one"
    two = tmp_path / "two"
    m1 = run_job(_opts(checkpoint, one, workers=1, bits=3, tiling="2D"), log=lambda _: None)
    m2 = run_job(_opts(checkpoint, two, workers=2, bits=3, tiling="2D"), log=lambda _: None)
    assert file_bytes(one) == file_bytes(two)
    assert m1["files"] == m2["files"]


def test_dry_run_plans_without_writing(checkpoint: Path, tmp_path: Path, capsys) -> None:
    lines: list[str] = []
    run_job(_opts(checkpoint, tmp_path / "never", dry_run=True), log=lines.append)
    text = "\n".join(lines)
    assert "model.layers.2" in text and "21 matrices quantized" in text and "worker memory" in text and "GB GPU" in text
    assert not (tmp_path / "never").exists()


def test_nan_weight_fails_the_job_naming_the_tensor(checkpoint: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in checkpoint.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    shard = next(p for p in sorted(bad.glob("*.safetensors")) if "model.layers.1.mlp.up_proj.weight" in load_file(p))
    tensors = load_file(shard)
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(JobError, match=r"model\.layers\.1\.mlp\.up_proj\.weight: weight contains NaN or Inf"):
        run_job(_opts(bad, tmp_path / "out"), log=lambda _: None)
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()


def test_group_size_that_does_not_divide_is_refused_at_plan_time(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(PlanError, match=r"model\.layers\.0\.mlp\.down_proj\.weight has in_features=256.*--exclude"):
        run_job(_opts(checkpoint, tmp_path / "out", group_size=96), log=lambda _: None)


def test_excluded_tensors_are_copied_and_listed_as_not_converted(checkpoint: Path, tmp_path: Path) -> None:
    manifest = run_job(_opts(checkpoint, tmp_path / "out", exclude=[r"\.down_proj\."]), log=lambda _: None)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "model.layers.0.mlp.down_proj" in cfg["quantization_config"]["modules_to_not_convert"]
    assert manifest["totals"]["tensors_quantized"] == 3 * 6
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert "model.layers.2.mlp.down_proj.weight" in index["weight_map"]


def test_cli_reports_a_bad_source_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "SINQ_AUTO_PATCH": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.quantize", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: ")
    assert str(tmp_path / "nope") in proc.stderr


def test_pickle_checkpoint_is_refused_and_never_loaded(tmp_path: Path) -> None:
    src = tmp_path / "pickled"
    src.mkdir()
    (src / "config.json").write_text("{}")
    torch.save({"w": torch.zeros(2)}, src / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin.*never unpickled"):
        run_job(_opts(src, tmp_path / "out"), log=lambda _: None)
