"""Evaluation from every kind of source and output: a local directory, s3:// (moto's server on
127.0.0.1) on either side, a Hub repo at a tag in an offline cache; synthetic sources refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from checkpoints import write_llama_checkpoint
from jobs import evaluate as evaluate_cli
from jobs import quantize as quantize_cli
from jobs.evaluate import evaluate
from pipeline.evaluate import perplexity, text_windows
from pipeline.io.storage import Location
from pipeline.loader import load_quantized, load_source
from test_loading import TEXT, _word_tokenizer
from test_pipeline_remote import _hub_cache

S3_BUCKETS = ("eval-src", "eval-out")  # moto's buckets are process-wide: names no other module uses
CTX, WINDOWS = 32, 3
COMMIT = "0a1b2c3d4e5f60718293a4b5c6d7e8f901234567"
pytestmark = pytest.mark.usefixtures("ray_after_s3")


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    src = write_llama_checkpoint(tmp_path_factory.mktemp("eval-src") / "tiny", layers=1, hidden=64,
                                 intermediate=128, vocab=32, shards=2, seed=7)
    _word_tokenizer(src)
    return src


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eval-text") / "text.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> tuple[torch.Tensor, float]:
    """The windows and the source perplexity the way transformers loads a local checkpoint."""
    ids = text_windows(AutoTokenizer.from_pretrained(str(checkpoint)), TEXT, CTX, WINDOWS)
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    return ids, perplexity(model, ids).ppl


def test_load_source_equals_from_pretrained(checkpoint: Path, reference) -> None:
    ids, ppl = reference
    ours = load_source(str(checkpoint))
    theirs = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    assert type(ours) is type(theirs)
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids[:1]).logits, theirs(input_ids=ids[:1]).logits)
    assert perplexity(ours, ids).ppl == ppl


@pytest.fixture(scope="module")
def hub_output(ray_after_s3, checkpoint: Path, text: Path, tmp_path_factory) -> Path:
    """``jobs.quantize --eval`` from a Hub repo at a tag, in an offline cache (windows of 2048 tokens)."""
    _hub_cache(checkpoint, "acme/eval-tiny", COMMIT, ref="v2")
    long_text = tmp_path_factory.mktemp("eval-long") / "long.txt"
    long_text.write_text(" ".join([TEXT] * 3))
    out = tmp_path_factory.mktemp("eval-hub") / "out"
    code = quantize_cli.main(["--model", "acme/eval-tiny@v2", "--out", str(out), "--workers", "1", "--eval",
                              "--eval-text", str(long_text), "--eval-windows", "2"])
    assert code == 0
    return out


def test_quantize_eval_from_a_hub_tag_in_an_offline_cache(hub_output: Path, text: Path, reference) -> None:
    from huggingface_hub import constants

    manifest = json.loads((hub_output / "manifest.json").read_text())
    assert manifest["source"]["commit"] == COMMIT and manifest["source"]["revision"] == "v2"
    saved = json.loads((hub_output / "eval.json").read_text())
    assert saved["ctx"] == 2048 and saved["windows"] == 2
    # The tag moves to a commit the cache does not hold: evaluation still reads the commit quantized.
    (Path(constants.HF_HUB_CACHE) / "models--acme--eval-tiny" / "refs" / "v2").write_text("f" * 40)
    lines: list[str] = []
    result = evaluate("acme/eval-tiny@v2", str(hub_output), text=str(text), ctx=CTX, windows=WINDOWS, log=lines.append)
    assert f"source acme/eval-tiny@v2 at commit {COMMIT}" in lines
    assert math.isclose(result["source"]["ppl"], reference[1], rel_tol=1e-6)
    assert json.loads((hub_output / "eval.json").read_text()) == json.loads(json.dumps(result))


def test_s3_source_to_s3_output(s3, checkpoint: Path, hub_output: Path, text: Path, reference) -> None:
    ids, ppl = reference
    src, out = "s3://eval-src/tiny", "s3://eval-out/tiny"
    s3.put(str(checkpoint) + "/", "eval-src/tiny/", recursive=True)
    s3.put(str(hub_output) + "/", "eval-out/tiny/", recursive=True)  # the same bytes as quantizing src
    result = evaluate(src, out, text=str(text), ctx=CTX, windows=WINDOWS, log=_quiet)
    assert json.loads(s3.cat_file("eval-out/tiny/eval.json")) == json.loads(json.dumps(result))
    assert result["windows"] == WINDOWS and result["ctx"] == CTX
    assert math.isclose(result["source"]["ppl"], ppl, rel_tol=1e-6)
    assert math.isclose(result["quantized"]["ppl"], perplexity(load_quantized(out), ids).ppl, rel_tol=1e-6)


def _one_line_failure(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip()
    assert code != 0 and err.startswith("error: ") and "\n" not in err, err
    return err


def test_synthetic_source_is_refused_before_quantizing(tmp_path: Path, text: Path, capsys) -> None:
    out = tmp_path / "out"
    code = quantize_cli.main(["--eval", "--model", "synthetic://tiny", "--out", str(out)])
    assert "synthetic source has no tokenizer" in _one_line_failure(capsys, code)
    assert not out.exists()
    code = evaluate_cli.main(["--model", "synthetic://tiny?layers=1", "--quantized", str(out), "--text", str(text)])
    assert "synthetic source has no tokenizer" in _one_line_failure(capsys, code)


def test_source_without_a_tokenizer_is_refused_before_quantizing(tmp_path: Path, capsys) -> None:
    src = write_llama_checkpoint(tmp_path / "untokenized", layers=1, hidden=64, intermediate=128, vocab=32, shards=1)
    out = tmp_path / "out"
    code = quantize_cli.main(["--eval", "--model", str(src), "--out", str(out)])
    assert "no tokenizer files" in _one_line_failure(capsys, code)
    assert not out.exists() and not Location(str(out)).exists("manifest.json")
