"""One family through the whole tool, as a new user meets it: a tiny random model saved in the Hub
layout, planned, quantized and assembled in-process (no Ray: the work is milliseconds), loaded with
``load_quantized``, and its logits compared with the model transformers itself loads from the same
checkpoint with the same quantization applied in memory.

Run in worker processes by ``test_families``; each call returns a verdict instead of raising, so
that one family's failure is a line in the coverage table and never stops the others.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

GROUP_SIZE = 32


@dataclass(frozen=True)
class Verdict:
    family: str
    status: str  # "pass", "fail", "not built" or "not runnable"
    reason: str = ""
    seconds: float = 0.0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def in_memory(model: torch.nn.Module, leaves: list[str], config) -> torch.nn.Module:
    """``model`` with each quantized leaf's weight replaced, in memory, by its quantize-dequantize round
    trip (a Conv1D's and a transposed expert's as the [out, in] matrix they compute with)."""
    from pipeline.architecture import expert_modules, experts_transposed, is_conv1d
    from sinq_ops import quantize

    experts = expert_modules(model)
    with torch.no_grad():
        for leaf in leaves:
            param, _, number = leaf.rpartition(".")
            module_name, _, attr = param.rpartition(".")
            if number.isdigit() and module_name in experts:
                stored = getattr(experts[module_name], attr)
                transposed = experts_transposed(experts[module_name])
                w = stored[int(number)].detach()
                q = quantize((w.t() if transposed else w).contiguous(), **config.to_dict()).dequantize(torch.float32)
                stored[int(number)] = q.t() if transposed else q
                continue
            module = model.get_submodule(leaf)
            conv = is_conv1d(module)
            w = module.weight.detach()
            q = quantize((w.t() if conv else w).contiguous(), **config.to_dict()).dequantize(torch.float32)
            module.weight.copy_(q.t() if conv else q)
    return model


def _state_mismatch(ours: torch.nn.Module, theirs: torch.nn.Module) -> str:
    """The first tensor (every parameter and persistent buffer, vision towers' included) where the
    model filled by this tool's conversion differs from the one transformers loaded."""
    mine, want = ours.state_dict(), theirs.state_dict()
    if set(mine) != set(want):
        return f"tensors {sorted(set(mine) ^ set(want))[:3]}"
    for name, tensor in want.items():
        if tensor.shape != mine[name].shape or not torch.equal(tensor.float(), mine[name].float()):
            return name
    return ""


def _logits(model: torch.nn.Module) -> torch.Tensor:
    """Logits on a few ordinary tokens (with a tiny image for the families that want one)."""
    import families

    inputs = families.example_inputs(model, length=12, seed=7)
    torch.manual_seed(0)  # a forward that samples (a diffusion model's noise) samples the same for both
    with torch.no_grad():
        out = model(**inputs, use_cache=False)
    return (out.logits if getattr(out, "logits", None) is not None else out[0]).float()


def _reference(src: Path) -> tuple[torch.nn.Module | None, str]:
    """transformers' own model of the saved checkpoint, or why there is none to compare with: it does
    not load its own save without missing or unexpected keys, or does not run on these inputs."""
    import transformers

    config = json.loads((src / "config.json").read_text())
    cls = getattr(transformers, config["architectures"][0])
    try:
        model, info = cls.from_pretrained(src, dtype=torch.float32, output_loading_info=True)
        lost = sorted(info["missing_keys"]) + sorted(info["unexpected_keys"])
        if lost:
            return None, f"transformers does not load its own save of it ({len(lost)} keys, first {lost[0]})"
        _logits(model.eval())
    except Exception as exc:  # noqa: BLE001 - what keeps transformers' own model from running
        return None, f"transformers' own model does not run on text: {_first_line(exc)}"
    return model, ""


def sweep_family(family: str, work: Path) -> Verdict:
    """``family`` end to end in ``work`` (removed afterwards). A family transformers cannot build tiny
    is "not built"; one whose own model does not load its save or run on a few tokens (robot policies
    that want a state, draft models that want their main model's caches) is "not runnable"."""
    import families
    from pipeline.job.options import JobOptions
    from pipeline.job.run import run_job
    from pipeline.loader import load_quantized, load_source
    from pipeline.output.layout import SIDECAR_NAME
    from sinq_ops import QuantConfig

    t0 = time.perf_counter()
    src, out = work / "src", work / "out"
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                families.save(family, src)
            except Exception as exc:  # noqa: BLE001 - a family transformers cannot build tiny is "not built"
                return Verdict(family, "not built", _first_line(exc), time.perf_counter() - t0)
            reference, why = _reference(src)
            if reference is None:
                return Verdict(family, "not runnable", why, time.perf_counter() - t0)
            try:
                run_job(JobOptions.from_settings({"model": str(src), "out": str(out), "group_size": GROUP_SIZE}),
                        log=lambda _: None, in_process=True)
                leaves = sorted(json.loads((out / SIDECAR_NAME).read_text()))
                mismatch = _state_mismatch(load_source(str(src)), reference)
                if mismatch:
                    return Verdict(family, "fail", f"the source read by load_source differs from transformers' "
                                   f"model: {mismatch}", time.perf_counter() - t0)
                want = _logits(in_memory(reference, leaves, QuantConfig(group_size=GROUP_SIZE)))
                got = _logits(load_quantized(str(out)))
            except Exception as exc:  # noqa: BLE001 - the family's verdict, not the sweep's end
                where = traceback.extract_tb(exc.__traceback__)[-1]
                return Verdict(family, "fail", f"{_first_line(exc)} ({Path(where.filename).name}:{where.lineno})",
                               time.perf_counter() - t0)
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-3, atol=1e-3):
            diff = (got - want).abs().max().item() if got.shape == want.shape else f"shapes {list(got.shape)}"
            return Verdict(family, "fail", f"logits differ from the in-memory quantization ({diff})",
                           time.perf_counter() - t0)
        return Verdict(family, "pass", f"{len(leaves)} matrices quantized", time.perf_counter() - t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
