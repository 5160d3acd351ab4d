"""A-SINQ jobs end to end on a real local Ray: the calibration stage's statistics against the whole
float model's, the output against the same search and quantization applied in memory, experts'
statistics from their own routed tokens, a driver killed mid-calibration, text from SeaweedFS."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import moe_models
import oracle  # noqa: F401  (puts the reference package on the path)
from checkpoints import write_llama_checkpoint
from jobs import quantize as cli
from pipeline.job.calibration.staged import load as load_stats
from pipeline.io.storage import Location
from pipeline.job.calibrate import CalibrationInput, run_calibration
from pipeline.job.calibration.options import CalibrationOptions
from pipeline.job.calibration.text import token_ids
from pipeline.job.options import JobOptions
from pipeline.job.plan import make_plan
from pipeline.job.unit import SEARCH
from pipeline.loader import load_quantized
from pipeline.sources import open_source
from pipeline_checks import file_bytes
from seaweed_server import seaweed_server
from sinq_ops import QuantConfig, QuantizedWeight, quantize
from sinq_ops.activation import search
from test_loading import TEXT, _word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION = ["--calibration-sequences", "4", "--calibration-length", "32", "--calibration-sample", "64"]


@pytest.fixture(scope="module")
def seaweed():
    with seaweed_server("calib") as fs:
        yield fs


@pytest.fixture(scope="module", autouse=True)
def ray_after_seaweed(seaweed, local_ray):
    """Ray starts once the endpoint and credentials are in the environment, which its workers inherit."""
    yield


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "calibration.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def dense(tmp_path_factory, seaweed, text_file: Path) -> tuple[Path, Path, str]:
    """A tiny Llama quantized with A-SINQ on two Ray workers, its calibration text read from SeaweedFS."""
    root = tmp_path_factory.mktemp("asinq")
    src = write_llama_checkpoint(root / "src", layers=2, hidden=128, intermediate=256, vocab=64, shards=2, seed=4)
    _word_tokenizer(src)
    seaweed.pipe("calib/texts/calibration.txt", text_file.read_bytes())
    out = root / "out"
    code = cli.main(["--model", str(src), "--out", str(out), "--method", "asinq", "--workers", "2",
                     "--calibration", "s3://calib/texts/calibration.txt", *CALIBRATION])
    assert code == 0
    return src, out, "s3://calib/texts/calibration.txt"


def _opts(src: Path, out: Path, text: str, **extra) -> JobOptions:
    return JobOptions.from_settings({"model": str(src), "out": str(out), "method": "asinq", "calibration": text,
                                     "calibration_sequences": 4, "calibration_length": 32, "calibration_sample": 64,
                                     **extra})


def _stage_here(opts: JobOptions, where: Path):
    """The calibration stage run in this process: the statistics the job staged and removed."""
    plan = make_plan(open_source(opts.model), opts.quant)
    given = CalibrationInput(plan, opts)
    location = Location(str(where))
    run_calibration(plan, opts, given, location, log=lambda _: None)
    return plan, given.ids(plan, opts), location


def _float_inputs(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every Linear's inputs in the whole float model's forward over ``ids``, one sequence at a time."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    with torch.no_grad():
        for row in ids:
            model(input_ids=row[None])
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def _stored_weight(out: Path, leaf: str) -> QuantizedWeight:
    tensors = {}
    for shard in out.glob("model-*.safetensors"):
        tensors.update({k: v for k, v in load_file(shard).items() if k.startswith(leaf + ".")})
    meta = json.loads((out / "model.safetensors.index.json.meta.json").read_text())[leaf]["meta"]
    return QuantizedWeight.from_state_dict(tensors, meta, leaf)


def test_dense_output_is_the_in_memory_search_on_the_float_models_statistics(dense, tmp_path: Path) -> None:
    src, out, text = dense
    manifest = json.loads((out / "manifest.json").read_text())
    assert {s["activation"] for s in manifest["tensors"]} == {"searched"}
    plan, ids, location = _stage_here(_opts(src, tmp_path / "o", text), tmp_path / "stage")
    model = torch.nn.Module()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    inputs = _float_inputs(model, ids)
    config = QuantConfig(method="asinq")
    errors = []
    for unit in plan.units:
        quantized = [t for t in unit.tasks if t.quantize]
        if not quantized:
            continue
        stats = load_stats(location, unit.block)
        for task in quantized:
            mean, sample = stats.inputs(task.leaf)
            x = inputs[task.leaf]
            # The layer-by-layer forward saw what the whole model's forward feeds this matrix.
            torch.testing.assert_close(mean, x.abs().mean(0), rtol=1e-5, atol=1e-6)
            w = model.get_submodule(task.leaf).weight.detach()
            scale = search(w, sample.float(), config, x_abs_mean=mean, **SEARCH)
            want = quantize(w, **config.to_dict(), activation_scale=scale)
            got = _stored_weight(out, task.leaf)
            assert torch.equal(got.dequantize(), want.dequantize()), task.leaf
            plain = quantize(w, **QuantConfig().to_dict())
            err = [float((x @ q.dequantize().t() - x @ w.t()).abs().mean()) for q in (got, plain)]
            # The search is never worse than SINQ on its sample, with its own rounding; on all the tokens,
            # with the stored 8-bit group scales, within a little of it.
            assert err[0] <= err[1] * 1.02, task.leaf
            errors.append(err)
    asinq, sinq = (sum(e[i] for e in errors) for i in (0, 1))
    assert asinq < 0.99 * sinq and sum(a < s for a, s in errors) >= 7


def test_dense_output_loads_in_ours_and_the_reference_loader(dense) -> None:
    from sinq.patch_model import AutoSINQHFModel

    _, out, _ = dense
    ids = torch.randint(1, 24, (2, 16), generator=torch.Generator().manual_seed(0))
    theirs = AutoSINQHFModel.from_quantized_safetensors(str(out), compute_dtype=torch.float32, device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, load_quantized(str(out))(ids).logits, rtol=1e-4, atol=1e-4)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["sinq_method"] == "asinq" and "A-SINQ" in (out / "README.md").read_text()


def test_experts_get_their_routed_tokens_and_an_unreached_expert_falls_back_to_sinq(tmp_path: Path,
                                                                                    text_file: Path) -> None:
    src = moe_models.save("qwen3_moe", tmp_path / "src")
    _word_tokenizer(src)
    out = tmp_path / "out"
    # Two sequences of two tokens: four tokens route to two of four experts each, so some expert gets none.
    settings = ["--calibration-sequences", "2", "--calibration-length", "2", "--calibration-sample", "4"]
    assert cli.main(["--model", str(src), "--out", str(out), "--method", "asinq", "--workers", "2",
                     "--calibration", str(text_file), *settings]) == 0
    opts = _opts(src, tmp_path / "o", str(text_file), calibration_sequences=2, calibration_length=2,
                 calibration_sample=4)
    plan, ids, location = _stage_here(opts, tmp_path / "stage")
    model = moe_models.build("qwen3_moe").float()
    routed: dict[str, list] = {}

    def capture(module, args, kwargs, name):
        x, index = args[0], args[1] if len(args) > 1 else kwargs["top_k_index"]
        routed.setdefault(name, []).append((x.reshape(-1, x.shape[-1]), index.reshape(x.reshape(-1, x.shape[-1]).shape[0], -1)))

    for name, module in model.named_modules():
        if name.endswith("mlp.experts"):
            module.register_forward_pre_hook(lambda m, a, k, n=name: capture(m, a, k, n), with_kwargs=True)
    with torch.no_grad():
        for row in ids:
            model(input_ids=row[None])
    activation = {s["name"]: s["activation"] for s in json.loads((out / "manifest.json").read_text())["tensors"]}
    unreached = 0
    for layer in range(2):
        block = f"model.layers.{layer}"
        stats = load_stats(location, block)
        name = f"{block}.mlp.experts"
        for e in range(4):
            tokens = torch.cat([x[(i == e).any(-1)] for x, i in routed[name]])
            leaf = f"{name}.gate_up_proj.{e}"
            if not tokens.shape[0]:
                unreached += 1
                assert stats.inputs(leaf) is None and activation[leaf] == "no calibration token was routed to this expert"
                w = model.get_submodule(name).gate_up_proj.detach()[e]
                sinq = quantize(w, **QuantConfig().to_dict())
                assert torch.equal(_stored_weight(out, leaf).dequantize(), sinq.dequantize())
                continue
            mean, sample = stats.inputs(leaf)
            torch.testing.assert_close(mean, tokens.abs().mean(0), rtol=1e-5, atol=1e-6)
            assert sample.shape[0] == tokens.shape[0] and activation[leaf] in ("searched", "kurtosis gate")
    assert unreached
    with torch.no_grad():
        load_quantized(str(out))(ids)


def test_a_driver_killed_during_calibration_reruns_to_the_same_bytes(tmp_path: Path, text_file: Path) -> None:
    src = write_llama_checkpoint(tmp_path / "src", layers=12, hidden=256, intermediate=512, vocab=64, shards=2, seed=8)
    _word_tokenizer(src)
    args = ["--method", "asinq", "--workers", "1", "--calibration", str(text_file), "--calibration-sequences", "16",
            "--calibration-length", "64", "--calibration-sample", "64"]
    clean = tmp_path / "clean"
    assert cli.main(["--model", str(src), "--out", str(clean), *args]) == 0
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "jobs.quantize", "--model", str(src), "--out", str(out), *args],
                            cwd=ROOT, env={**os.environ, "SINQ_AUTO_PATCH": "0"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 240
    staged: list[Path] = []
    while time.time() < deadline and len(staged) < 2 and proc.poll() is None:
        staged = list(out.glob(".staging/*/calibration/*.json"))
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
    proc.wait()
    staged = list(out.glob(".staging/*/calibration/*.json"))
    assert 2 <= len(staged) < 12 and not list(out.glob(".staging/*/unit-*.json"))

    rerun = subprocess.run([sys.executable, "-m", "jobs.quantize", "--model", str(src), "--out", str(out), *args],
                           cwd=ROOT, env={**os.environ, "SINQ_AUTO_PATCH": "0"}, text=True, capture_output=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    reused = int(re.search(r"resuming, (\d+) of 12 layers' statistics staged", rerun.stdout).group(1))
    assert reused >= 2
    assert file_bytes(out) == file_bytes(clean)


@pytest.mark.parametrize(("args", "expected"), [
    (["--method", "asinq", "--tiling", "2D"], "method='asinq' needs tiling='1D'"),
    (["--calibration", "x.txt"], "--calibration is read by --method asinq only"),
    (["--method", "asinq", "--format", "compressed-tensors", "--bits", "3"], "--format compressed-tensors cannot hold"),
    (["--method", "asinq", "--calibration-sequences", "0"], "--calibration-sequences must be an integer of at least 1"),
])
def test_bad_options_are_refused_in_one_line(args: list[str], expected: str, tmp_path: Path, capsys) -> None:
    assert cli.main(["--model", "synthetic://tiny", "--out", str(tmp_path / "o"), *args]) != 0
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1


def test_a_text_too_short_or_missing_is_refused_before_any_layer_runs(dense, tmp_path: Path, capsys) -> None:
    src, _, _ = dense
    short = tmp_path / "short.txt"
    short.write_text("the cat")
    for text, expected in ((short, "fewer than --calibration-sequences 4 x --calibration-length 32"),
                           (tmp_path / "absent.txt", "cannot be read")):
        out = tmp_path / "out"
        assert cli.main(["--model", str(src), "--out", str(out), "--method", "asinq", "--calibration", str(text),
                         *CALIBRATION]) != 0
        err = capsys.readouterr().err.strip()
        assert expected in err and len(err.splitlines()) == 1
        assert not list(out.glob(".staging/*/calibration/*"))


def test_the_calibration_tokens_are_the_whole_texts_first_though_only_a_prefix_is_tokenized(dense) -> None:
    from transformers import AutoTokenizer

    source = open_source(str(dense[0]))
    words = TEXT.split()
    text = " ".join(words * 40)  # about 50,000 tokens: far more than the prefix the job tokenizes
    whole = AutoTokenizer.from_pretrained(str(dense[0]))(text)["input_ids"]
    for sequences, length in ((2, 16), (4, 300), (1, len(whole))):  # the last needs every token of the text
        ids = token_ids(source, text, CalibrationOptions(sequences=sequences, length=length), "text.txt")
        assert ids.tolist() == [whole[i * length:(i + 1) * length] for i in range(sequences)]


def test_dry_run_prints_the_calibration_plan_and_its_memory_per_worker(capsys) -> None:
    assert cli.main(["--model", "synthetic://llama-70b", "--method", "asinq", "--dry-run", "--calibration-sequences",
                     "128", "--calibration-length", "2048"]) == 0
    text = capsys.readouterr().out
    assert "calibration   128 x 2048 tokens" in text and "per worker" in text
    per_worker = float(re.search(r"per worker  ([\d.]+) GB", text).group(1))
    assert 2 < per_worker < 12  # sharded hidden states and one layer: fits a 24 GB card's share
