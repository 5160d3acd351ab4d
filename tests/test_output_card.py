"""The output's model card (README.md), the source's licence files, evaluation results recorded
into a complete output, and plain transformers loading of rtn and nf4 outputs with the reference
package's import hook."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import oracle  # noqa: F401  (puts the reference package on the path)
from checkpoints import write_llama_checkpoint
from pipeline.evaluate import Perplexity, report
from pipeline.io.storage import Location
from pipeline.job.options import JobOptions
from pipeline.job.run import run_job
from pipeline.loader import load_quantized
from pipeline.output.card import record_evaluation, render_card
from pipeline.output.layout import CARD_NAME, EVAL_NAME
from pipeline.output.manifest import MANIFEST_NAME, IncompleteOutput, verify
from pipeline.sources import open_source
from sinq_ops import QuantConfig

ROOT = Path(__file__).resolve().parents[1]
LICENCE = "Acme Model Licence\n\nYou may use these weights ... \u00a9 Acme \u2014 all rights reserved.\n".encode()
USE_POLICY = b"# Acme acceptable use policy\n\nDo not use the model to ...\n"
SOURCE_CARD = "---\nlicense: other\nlicense_name: acme-model-licence\nlicense_link: LICENSE\n---\n\n# Acme tiny llama\n"

pytestmark = pytest.mark.usefixtures("local_ray")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    src = write_llama_checkpoint(tmp_path_factory.mktemp("card") / "acme-tiny", layers=1, hidden=64, intermediate=128,
                                 vocab=64, shards=1, seed=5)
    (src / "LICENSE").write_bytes(LICENCE)
    (src / "USE_POLICY.md").write_bytes(USE_POLICY)
    (src / "README.md").write_text(SOURCE_CARD)
    (src / "notes.txt").write_text("not an asset\n")
    (src / "LICENSES").mkdir()  # a directory, not a licence file
    (src / "LICENSES" / "MIT.txt").write_text("MIT\n")
    return src


@pytest.fixture(scope="module")
def outputs(source: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("card-out")
    outs = {}
    for name, quant, workers in (("nf4", QuantConfig(method="nf4"), 2), ("rtn", QuantConfig(method="rtn"), 1),
                                 ("nf4-2d", QuantConfig(method="nf4", tiling="2D", group_size=32), 1)):
        outs[name] = root / name
        run_job(JobOptions(model=str(source), out=str(outs[name]), quant=quant, workers=workers), log=lambda _: None)
    return outs


def _card(out: Path):
    from huggingface_hub import ModelCard

    return ModelCard.load(out / CARD_NAME)


def _record(manifest: dict, name: str) -> dict:
    (rec,) = [f for f in manifest["files"] if f["name"] == name]
    return rec


def test_card_front_matter_states_the_quantization_and_its_error(outputs) -> None:
    out = outputs["nf4"]
    manifest = verify(Location(str(out)))
    data = _card(out).data
    assert data.base_model_relation == "quantized"
    assert data.base_model is None  # a local source has no Hub id to name
    assert {"sinq", "quantized", "4-bit", "nf4"} <= set(data.tags)
    assert data.library_name == "sinq-cluster"  # nf4 with 1D tiling: not through transformers (see below)
    assert data.quantization == manifest["quantization"]
    assert data.quantization["method"] == "nf4" and data.quantization["bits"] == 4
    t = manifest["totals"]
    assert data.quantization_summary == {
        "tensors_quantized": t["tensors_quantized"], "tensors_copied": t["tensors_copied"],
        "mean_rel_error": t["mean_rel_error"], "max_rel_error": t["max_rel_error"], "worst_tensor": t["worst_tensor"],
        "source_bytes": t["source_bytes"], "quantized_bytes": t["tensor_bytes"], "shards": t["shards"],
    }
    assert t["tensors_quantized"] == 7
    # The source card's licence fields carry over.
    assert (data.license, data.license_name, data.license_link) == ("other", "acme-model-licence", "LICENSE")
    text = (out / CARD_NAME).read_text()
    assert t["worst_tensor"] in text and "load_quantized" in text and "from_pretrained" in text
    assert "`LICENSE`" in text and "`USE_POLICY.md`" in text
    assert "does not load through plain transformers `from_pretrained`" in text and "AutoModelForCausalLM" not in text
    for loadable in ("rtn", "nf4-2d"):
        card = _card(outputs[loadable])
        assert card.data.library_name == "transformers" and "AutoModelForCausalLM.from_pretrained" in card.text
        assert "does not load" not in card.text
    rec = _record(manifest, CARD_NAME)
    assert rec["sha256"] == hashlib.sha256((out / CARD_NAME).read_bytes()).hexdigest()


def test_card_depends_only_on_what_the_job_did(outputs, source: Path) -> None:
    """The same job gives the same card: timings, workers and the destination never reach it, nor
    does the source's local path."""
    out = outputs["nf4"]
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    licence = {"license": "other", "license_name": "acme-model-licence", "license_link": "LICENSE"}
    shuffled = {**manifest, "timings": {"total_s": 1e6}, "run_key": "x",
                "units": [{**u, "worker": "elsewhere", "seconds": 0.0} for u in manifest["units"]]}
    assert render_card(shuffled, licence=licence).encode() == (out / CARD_NAME).read_bytes()
    assert str(source.parent) not in (out / CARD_NAME).read_text()


def test_hub_source_is_named_as_the_base_model(outputs) -> None:
    manifest = json.loads((outputs["nf4"] / MANIFEST_NAME).read_text())
    commit = "0123456789abcdef0123456789abcdef01234567"
    manifest["source"] = {"spec": "acme/tiny@v1", "repo_id": "acme/tiny", "revision": "v1", "commit": commit}
    card = render_card(manifest)
    from huggingface_hub import ModelCard

    data = ModelCard(card).data
    assert data.base_model == "acme/tiny" and data.base_model_relation == "quantized"
    assert commit in card and "https://huggingface.co/acme/tiny" in card


def test_card_names_no_credentials_or_local_paths(outputs) -> None:
    manifest = json.loads((outputs["nf4"] / MANIFEST_NAME).read_text())
    for spec, shown in [
        ("https://alice:hunter2@models.example.com:8443/acme/tiny?token=s3cr3t#frag", "https://models.example.com:8443/acme/tiny"),
        ("s3://models/acme/tiny", "s3://models/acme/tiny"),
        ("/home/alice/private/checkpoints/acme-tiny", "`acme-tiny`"),
    ]:
        card = render_card({**manifest, "source": {"spec": spec, "url": spec}})
        assert shown in card
        for secret in ("alice", "hunter2", "s3cr3t", "frag", "/home", "private"):
            assert secret not in card, (spec, secret)


def test_licence_files_travel_byte_identical_and_are_listed(outputs, source: Path) -> None:
    out = outputs["nf4"]
    manifest = verify(Location(str(out)))
    names = {f["name"] for f in manifest["files"]}
    for name in ("LICENSE", "USE_POLICY.md"):
        assert (out / name).read_bytes() == (source / name).read_bytes()
        assert name in names
        assert _record(manifest, name) == {"name": name, "bytes": (source / name).stat().st_size,
                                           "sha256": hashlib.sha256((source / name).read_bytes()).hexdigest()}
    assert names >= {CARD_NAME, "config.json", "generation_config.json"}
    assert not (out / "notes.txt").exists() and not (out / "LICENSES").exists()
    # The output's README.md is its own card, not the source's.
    assert (out / CARD_NAME).read_text() != SOURCE_CARD


def test_hub_sources_find_licence_files_in_a_linked_snapshot(source: Path) -> None:
    """A real Hub cache: snapshot entries are relative links into blobs/."""
    from huggingface_hub import constants

    commit = "89abcdef0123456789abcdef0123456789abcdef"
    base = Path(constants.HF_HUB_CACHE) / "models--acme--card-tiny"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    (base / "blobs").mkdir()
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in source.iterdir():
        if f.is_file():
            blob = hashlib.sha256(f.read_bytes()).hexdigest()
            (base / "blobs" / blob).write_bytes(f.read_bytes())
            (snap / f.name).symlink_to(Path("..", "..", "blobs", blob))
    hub = open_source("acme/card-tiny")
    assert set(hub.assets()) == {"generation_config.json", "tokenizer_config.json", "LICENSE", "USE_POLICY.md"}
    assert hub.read_bytes("LICENSE") == LICENCE
    local = open_source(str(snap))  # the same snapshot passed as a directory
    assert local.assets() == hub.assets()


def test_hub_sources_online_list_the_repo_at_its_commit(monkeypatch) -> None:
    from huggingface_hub import HfApi, constants

    from pipeline.sources.hub import HubSource

    calls = []

    def list_repo_files(self, repo_id, revision=None, **kw):
        calls.append((repo_id, revision))
        return ["config.json", "LICENSE.txt", "NOTICE", "USE_POLICY.md", "tokenizer.json", "original/LICENSE",
                "model.safetensors"]

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "list_repo_files", list_repo_files)
    hub = HubSource(spec="acme/x", location=Location("/nonexistent"), repo_id="acme/x", revision="c0ffee")
    assert hub.asset_names() == ["tokenizer.json", "LICENSE.txt", "NOTICE", "USE_POLICY.md"]
    assert calls == [("acme/x", "c0ffee")]


def _report(tmp_path: Path, src_ppl: float, q_ppl: float) -> dict:
    text = tmp_path / "wikitext-sample.txt"
    text.write_text("the cat sat on the mat\n" * 10)
    return report(Perplexity(src_ppl, 2.0, 4, 128, 1.5), Perplexity(q_ppl, 2.1, 4, 128, 2.5), text=str(text), ctx=32)


def _copy(out: Path, to: Path) -> Path:
    to.mkdir()
    for f in out.iterdir():
        if f.is_file():
            (to / f.name).write_bytes(f.read_bytes())
    return to


def test_record_evaluation_puts_the_figures_in_the_card_and_keeps_the_output_verifying(outputs, tmp_path: Path) -> None:
    out = _copy(outputs["nf4"], tmp_path / "out")
    before = json.loads((out / MANIFEST_NAME).read_text())
    first = _report(tmp_path, 18.5, 19.25)
    record_evaluation(Location(str(out)), first)
    second = _report(tmp_path, 18.628, 22.69)
    record_evaluation(Location(str(out)), second)  # a later evaluation replaces the first

    manifest = verify(Location(str(out)))  # sizes and sha256 of every file, README.md and eval.json included
    assert (out / EVAL_NAME).read_text() == json.dumps(second, indent=2) + "\n"
    names = [f["name"] for f in manifest["files"]]
    assert names.count(EVAL_NAME) == 1 and names.count(CARD_NAME) == 1 and names == sorted(names)
    assert manifest["totals"]["output_bytes"] == sum(f["bytes"] for f in manifest["files"])
    assert {k: v for k, v in manifest.items() if k not in ("files", "totals")} == \
        {k: v for k, v in before.items() if k not in ("files", "totals")}

    card = _card(out)
    results = {r.metric_type: r for r in card.data.eval_results}
    assert results["perplexity"].metric_value == second["quantized"]["ppl"]
    assert results["perplexity_ratio"].metric_value == pytest.approx(22.69 / 18.628)
    assert results["perplexity"].dataset_name == "wikitext-sample.txt"
    assert results["perplexity"].dataset_args == {"ctx": 32, "windows": 4, "tokens": 128}
    assert card.data.license_name == "acme-model-licence" and card.data.base_model_relation == "quantized"
    assert "| source | 18.6280 |" in card.text and "| quantized | 22.6900 |" in card.text
    assert f"| ratio | {22.69 / 18.628:.4f} |" in card.text and "19.2500" not in card.text
    assert str(tmp_path) not in card.content  # the text is named by its file name only
    load_quantized(str(out), check_hashes=True)


def test_record_evaluation_refuses_an_incomplete_output(outputs, tmp_path: Path) -> None:
    out = _copy(outputs["nf4"], tmp_path / "out")
    (out / MANIFEST_NAME).unlink()
    card = (out / CARD_NAME).read_bytes()
    with pytest.raises(IncompleteOutput):
        record_evaluation(Location(str(out)), _report(tmp_path, 10.0, 11.0))
    assert not (out / EVAL_NAME).exists() and (out / CARD_NAME).read_bytes() == card


def _ids() -> torch.Tensor:
    return torch.randint(1, 64, (2, 16), generator=torch.Generator().manual_seed(1))


def test_plain_transformers_with_the_reference_hook_computes_what_our_loader_does_or_refuses(outputs, tmp_path: Path) -> None:
    """rtn and 2D-tiled nf4 outputs: config.json says what transformers' SinqConfig accepts, the
    reference's hook decodes each layer by the method its sidecar entry names, and the logits equal
    our loader's. nf4 with 1D tiling, which the hook would run through GemLite's uniform decoder on
    CUDA, is refused, with and without the hook. Transformers without the hook refuses the others or
    computes the same thing: never something else."""
    from transformers import SinqConfig

    loadable = {"rtn": "rtn_quantAux", "nf4-2d": "sinq_nf4_quantAux"}
    for name, out in outputs.items():
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        method = name.split("-")[0]
        assert qc["sinq_method"] == method
        assert json.loads((out / MANIFEST_NAME).read_text())["quantization"]["method"] == method
        sidecar = json.loads((out / "model.safetensors.index.json.meta.json").read_text())
        assert {e["meta"]["method"] for e in sidecar.values()} == {"rtn_quantAux" if method == "rtn" else "sinq_nf4_quantAux"}
        if name in loadable:
            assert (qc["quant_method"], qc["method"]) == ("sinq", "sinq")
            SinqConfig.from_dict(qc)  # what transformers builds from it; raises on a method it does not know
        else:
            assert "quant_method" not in qc and "method" not in qc and qc["loader"] == "pipeline.loader.load_quantized"

    stub = tmp_path / "stubs" / "datasets"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("load_dataset = None\n")  # imported by the package, never used here
    env = {k: v for k, v in os.environ.items() if k != "SINQ_AUTO_PATCH"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("SINQ_ORACLE_PATH", ""), str(tmp_path / "stubs"), str(ROOT)) if p)
    results = tmp_path / "results"
    results.mkdir()
    script = f"""
import os, torch
assert os.environ.get("SINQ_PTH_LOADED") == "1", "import hook not active"
from transformers import AutoModelForCausalLM
from sinq.hf_io import patch_hf_pretrained_io, unpatch_hf_pretrained_io
ids = torch.tensor({_ids().tolist()})
results = {str(results)!r}

def attempt(tag, path):
    try:
        model = AutoModelForCausalLM.from_pretrained(path)
        with torch.no_grad():
            logits = model(ids).logits.float()
    except Exception as exc:
        open(os.path.join(results, tag + ".refused"), "w").write(type(exc).__name__ + ": " + str(exc)[:300])
        return
    torch.save(logits, os.path.join(results, tag + ".pt"))
    open(os.path.join(results, tag + ".class"), "w").write(type(model.model.layers[0].mlp.down_proj).__name__)

outs = {json.dumps({n: str(p) for n, p in outputs.items()})}
for name, path in outs.items():
    attempt(name + "-hook", path)
for name, path in outs.items():
    unpatch_hf_pretrained_io()  # transformers' own SINQ support alone (its loader patches the hook back in)
    attempt(name + "-native", path)
"""
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, out in outputs.items():
        with torch.no_grad():
            ours = load_quantized(str(out))(_ids()).logits
        if name in loadable:
            assert (results / f"{name}-hook.class").read_text() == "SINQLinear", name
            torch.testing.assert_close(torch.load(results / f"{name}-hook.pt"), ours, rtol=1e-4, atol=1e-4)
        else:
            assert not (results / f"{name}-hook.pt").exists(), f"{name} loaded through the hook"
            assert "quant_method" in (results / f"{name}-hook.refused").read_text()
        native = results / f"{name}-native.pt"
        if native.exists():
            torch.testing.assert_close(torch.load(native), ours, rtol=1e-4, atol=1e-4)
        else:
            assert (results / f"{name}-native.refused").read_text(), name
