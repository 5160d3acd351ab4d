"""A compressed-tensors output served by a real engine: vLLM's CPU build, started as its own process
on 127.0.0.1 from ``.venv-serve`` (``tests/vllm_server.py``), one server for the module.

The output is A-SINQ's: the same tensors as SINQ's, with every fold SINQ makes and the activation
scale divided out of each column scale before it folds (calibrated in process on the module's text),
so the engine reads the most that any method of ours writes into the format.

The engine's prompt log-probabilities are compared with ``load_quantized`` on the same codes, and
transformers' own compressed-tensors loader (in the serving environment, with its pinned
compressed-tensors) with ``load_quantized``'s logits; ``sinq-evaluate --engine`` measures
perplexity through the engine.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from jobs import evaluate as evaluate_cli
from pipeline.engine import Engine, engine_perplexity
from pipeline.evaluate import perplexity, text_windows
from pipeline.job.calibration.options import CalibrationOptions
from pipeline.job.options import JobOptions
from pipeline.job.run import run_job
from pipeline.loader import load_quantized
from sinq_ops import QuantConfig
from test_loading import TEXT, _word_tokenizer
from vllm_server import serve_env, serve_python, vllm_server

CONFIG = QuantConfig(bits=4, group_size=32, method="asinq")


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> tuple[Path, Path, str, Path]:
    root = tmp_path_factory.mktemp("serving")
    src = root / "src"
    vocab = _word_tokenizer(src)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=-(-vocab // 64) * 64, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, initializer_range=0.08,
        max_position_embeddings=512, dtype="bfloat16")).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    model.save_pretrained(src)
    out = root / "out"
    text = root / "text.txt"
    text.write_text(TEXT)
    run_job(JobOptions(model=str(src), out=str(out), quant=CONFIG, output_format="compressed-tensors",
                       calibration=CalibrationOptions(text=str(text), sequences=4, length=64, sample=128)),
            in_process=True, log=lambda _: None)
    assert "searched" in json.dumps(json.loads((out / "manifest.json").read_text()))
    with vllm_server(out, root / "vllm.log") as server:
        yield src, out, server.url, text


def _windows(src: Path, text: Path, ctx: int = 48, n: int = 3) -> torch.Tensor:
    return text_windows(AutoTokenizer.from_pretrained(str(src)), text.read_text(), ctx, n)


def _logprobs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(ids.unsqueeze(0)).logits[0, :-1].double()
    return logits.log_softmax(-1).gather(1, ids[1:, None])[:, 0]


def test_engine_computes_what_load_quantized_computes(served) -> None:
    src, out, url, text = served
    ours = load_quantized(str(out), dtype=torch.float32)
    float_model = LlamaForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    engine = Engine(url)
    model = engine.served_model()
    for w in _windows(src, text):
        got = torch.tensor(engine.prompt_logprobs(w.tolist(), model), dtype=torch.float64)
        want = _logprobs(ours, w)
        to_float = (got - _logprobs(float_model, w)).abs().max()
        diff = (got - want).abs().max()
        assert diff < 0.02, diff  # float16 activations in the engine, float32 here
        assert diff < to_float / 3, (diff, to_float)  # it serves the quantized weights, not the float ones


def test_transformers_compressed_tensors_loader_gives_the_same_logits(served, tmp_path: Path) -> None:
    src, out, _, text = served
    ids = _windows(src, text, 32, 1)[0]
    script = ("import sys, torch\nfrom transformers import AutoModelForCausalLM\n"
              "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()\n"
              "ids = torch.tensor([[int(t) for t in sys.argv[2].split(',')]])\n"
              "with torch.no_grad():\n    torch.save(m(ids).logits[0], sys.argv[3])\n")
    dump = tmp_path / "logits.pt"
    run = subprocess.run([str(serve_python()), "-c", script, str(out), ",".join(map(str, ids.tolist())), str(dump)],
                         env=serve_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = torch.load(dump)
    with torch.no_grad():
        ours = load_quantized(str(out), dtype=torch.float32)(ids.unsqueeze(0)).logits[0]
    assert (theirs - ours).abs().max() < 1e-4 * ours.abs().max(), (theirs - ours).abs().max()


def test_perplexity_through_the_engine(served, capsys) -> None:
    src, out, url, text = served
    ids = _windows(src, text, 48, 4)
    through_engine = engine_perplexity(Engine(url), ids).ppl
    in_process = perplexity(load_quantized(str(out)), ids).ppl
    assert abs(through_engine / in_process - 1) < 0.01, (through_engine, in_process)
    code = evaluate_cli.main(["--model", str(src), "--quantized", str(out), "--engine", url, "--text", str(text),
                              "--ctx", "48", "--windows", "4"])
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "eval.json").read_text())
    assert result["quantized"]["engine"] == {"url": url, "model": str(out)}
    assert abs(result["quantized"]["ppl"] - through_engine) < 1e-6 * through_engine
    assert f"served by {out} at {url}" in (out / "README.md").read_text()


@pytest.mark.parametrize("url, expected", [
    ("http://127.0.0.1:9", "error: http://127.0.0.1:9/v1/models: "),
    ("http://user:s3cret@127.0.0.1:9", "no user, password or query in it; pass the engine's API key in $SINQ_ENGINE_API_KEY"),
    ("127.0.0.1:9", "must be an http:// or https:// URL"),
])
def test_a_bad_engine_fails_in_one_line_before_any_work(served, capsys, url: str, expected: str) -> None:
    src, out, _, text = served
    code = evaluate_cli.main(["--model", str(src), "--quantized", str(out), "--engine", url, "--text", str(text),
                              "--ctx", "48", "--windows", "1"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and expected in err and "s3cret" not in err, err


def test_an_engine_serving_another_directory_or_a_short_context_is_refused(served, tmp_path: Path, capsys) -> None:
    src, out, url, text = served
    code = evaluate_cli.main(["--model", str(src), "--quantized", str(out), "--engine", url, "--text", str(text),
                              "--ctx", "600", "--windows", "1"])
    assert code == 1 and "shorter than a window of 600 tokens" in capsys.readouterr().err
    other = tmp_path / "other"
    shutil.copytree(out, other)
    code = evaluate_cli.main(["--model", str(src), "--quantized", str(other), "--engine", url, "--text", str(text),
                              "--ctx", "48", "--windows", "1"])
    assert code == 1 and f"serves {out}, not {other}" in capsys.readouterr().err

def test_packing_is_compressed_tensors_own() -> None:
    """Our int32 packing against the compressed-tensors package vLLM pins (its values are signed:
    ours plus the 2 ** (bits - 1) offset it adds before packing)."""
    script = ("import sys, torch\nsys.path.insert(0, sys.argv[1])\n"
              "from sinq_ops.compressed import pack_int32\n"
              "from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32\n"
              "for bits in (4, 8):\n    for dim in (0, 1):\n"
              "        v = torch.randint(0, 2 ** bits, (24, 40), dtype=torch.uint8)\n"
              "        signed = (v.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)\n"
              "        assert torch.equal(pack_int32(v, bits, dim), pack_to_int32(signed, bits, packed_dim=dim)), (bits, dim)\n")
    run = subprocess.run([str(serve_python()), "-c", script, str(Path(__file__).resolve().parents[1])],
                         env=serve_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
