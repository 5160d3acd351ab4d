"""Loading quantized outputs: SINQLinear, our loader, the reference's loader, and plain
transformers with the reference package's import hook; perplexity arithmetic."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import oracle  # noqa: F401  (puts the reference package on the path)
from jobs.evaluate import evaluate
from matrices import llm_like
from pipeline.evaluate import perplexity, text_windows
from checkpoints import write_llama_checkpoint
from pipeline.loader import load_quantized
from pipeline.output.manifest import MANIFEST_NAME, IncompleteOutput
from pipeline.job.options import JobOptions
from pipeline.job.run import run_job
from sinq_ops import SINQLinear, quantize

ROOT = Path(__file__).resolve().parents[1]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TEXT = " ".join(f"the {w} of the {v} is {u} ." for w, v, u in zip(
    ["cat", "dog", "sun", "sea", "map", "key"] * 40, ["house", "city", "road", "hill", "lake"] * 48,
    ["red", "big", "old", "new"] * 60))


pytestmark = pytest.mark.usefixtures("local_ray")


def _word_tokenizer(out: Path) -> int:
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(sorted(set(TEXT.split())))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(out)
    return len(vocab)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("loading")
    src = write_llama_checkpoint(root / "src", layers=2, hidden=128, intermediate=256, vocab=64, shards=2, seed=4)
    _word_tokenizer(src)
    out = root / "out"
    run_job(JobOptions(model=str(src), out=str(out), workers=2), log=lambda _: None)
    return src, out


def _dense_dequantized(src: Path, out: Path) -> torch.nn.Module:
    """The source model with each quantized weight replaced by its dequantized value."""
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    q = load_quantized(str(out))
    for name, module in q.named_modules():
        if isinstance(module, SINQLinear):
            model.get_submodule(name).weight.data = module.quantized_weight().dequantize()
    return model


def _ids() -> torch.Tensor:
    return torch.randint(1, 64, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("tiling", "aux", "bits"), [("1D", "int8", 4), ("1D", "fp16", 3), ("2D", "int8", 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sinq_linear_equals_dense_matmul(tiling: str, aux: str, bits: int, dtype: torch.dtype, device: str) -> None:
    w = llm_like(128, 192, seed=1).to(device)
    q = quantize(w, bits=bits, tiling=tiling, aux=aux)
    bias = torch.randn(128, device=device)
    layer = SINQLinear(q, bias, compute_dtype=dtype).to(device)
    x = torch.randn(3, 5, 192, device=device)
    want = F.linear(x.to(dtype), q.dequantize(dtype), bias.to(dtype)).float()
    got = layer(x)
    assert got.shape == (3, 5, 128) and got.dtype == x.dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * float(want.abs().max()))


def test_our_loader_matches_the_dense_dequantized_model(model_dirs) -> None:
    src, out = model_dirs
    ours = load_quantized(str(out))
    assert sum(isinstance(m, SINQLinear) for m in ours.modules()) == 14
    dense = _dense_dequantized(src, out)
    with torch.no_grad():
        torch.testing.assert_close(ours(_ids()).logits, dense(_ids()).logits, rtol=1e-4, atol=1e-4)
    prompt = _ids()[:1, :5]
    generated = ours.generate(prompt, max_new_tokens=6, do_sample=False)
    assert generated.shape[1] > 5 and torch.equal(generated, dense.generate(prompt, max_new_tokens=6, do_sample=False))


def test_reference_loader_gives_the_same_logits(model_dirs) -> None:
    from sinq.patch_model import AutoSINQHFModel

    _, out = model_dirs
    theirs = AutoSINQHFModel.from_quantized_safetensors(str(out), compute_dtype=torch.float32, device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(theirs(_ids()).logits, load_quantized(str(out))(_ids()).logits, rtol=1e-4, atol=1e-4)


def test_plain_transformers_with_the_reference_hook_gives_the_same_logits(model_dirs, tmp_path: Path) -> None:
    _, out = model_dirs
    stub = tmp_path / "stubs" / "datasets"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("load_dataset = None\n")  # imported by the package, never used here
    oracle_dir = os.environ.get("SINQ_ORACLE_PATH", "")
    env = {k: v for k, v in os.environ.items() if k != "SINQ_AUTO_PATCH"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (oracle_dir, str(tmp_path / "stubs"), str(ROOT)) if p)
    script = (
        "import os, sys, torch\n"
        "assert os.environ.get('SINQ_PTH_LOADED') == '1', 'import hook not active'\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
        "assert type(m.model.layers[0].self_attn.q_proj).__name__ == 'SINQLinear'\n"
        f"ids = torch.tensor({_ids().tolist()})\n"
        f"torch.save(m(ids).logits.detach(), {str(tmp_path / 'logits.pt')!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with torch.no_grad():
        ours = load_quantized(str(out))(_ids()).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), ours, rtol=1e-4, atol=1e-4)


def test_loader_refuses_an_output_without_a_manifest(model_dirs, tmp_path: Path) -> None:
    _, out = model_dirs
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in out.iterdir():
        if f.name != MANIFEST_NAME:
            (copy / f.name).write_bytes(f.read_bytes())
    with pytest.raises(IncompleteOutput, match="no manifest.json"):
        load_quantized(str(copy))
    unchecked = load_quantized(str(copy), require_manifest=False)
    with torch.no_grad():
        torch.testing.assert_close(unchecked(_ids()).logits, load_quantized(str(out))(_ids()).logits, rtol=0, atol=0)


def test_perplexity_is_the_mean_window_cross_entropy() -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    windows = torch.randint(0, 50, (3, 16))
    by_hand = []
    with torch.no_grad():
        for w in windows:
            logp = torch.log_softmax(model(w[None]).logits[0].double(), -1)
            by_hand.append(-sum(float(logp[t, w[t + 1]]) for t in range(15)) / 15)
    result = perplexity(model, windows)
    assert result.windows == 3 and result.tokens == 48
    assert math.isclose(result.nll, sum(by_hand) / 3, rel_tol=1e-5)
    assert math.isclose(result.ppl, math.exp(sum(by_hand) / 3), rel_tol=1e-5)


def test_evaluate_writes_eval_json(model_dirs, tmp_path: Path) -> None:
    src, out = model_dirs
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    result = evaluate(str(src), str(out), text=str(text), ctx=32, windows=4, log=lambda _: None)
    saved = json.loads((out / "eval.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["windows"] == 4 and saved["ctx"] == 32
    assert math.isclose(saved["ppl_ratio"], saved["quantized"]["ppl"] / saved["source"]["ppl"])
    from transformers import AutoTokenizer

    ids = text_windows(AutoTokenizer.from_pretrained(str(src)), TEXT, 32, 4)
    assert math.isclose(saved["source"]["ppl"], perplexity(AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32), ids).ppl, rel_tol=1e-6)
