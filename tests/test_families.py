"""Every decoder-only and image-text-to-text family transformers registers, through the whole tool.

Each family is built tiny from its own config class (``families``), saved in the Hub layout, and
goes plan -> quantize -> load -> forward (``family_sweep``), its logits compared with the model
transformers itself loads from that checkpoint with the same quantization applied in memory. The
sweep follows transformers: a family it adds tomorrow is swept tomorrow, with no change here.
It prints the coverage (passing / built / registered) and why each family that fails failed.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

import families
from family_sweep import Verdict, sweep_family

# The families the releases that prompted this sweep belong to: each must pass, whatever the share.
NAMED = ("deepseek_v32", "glm_moe_dsa", "jamba", "kimi_linear", "falcon", "nemotron_h", "granitemoehybrid",
         "falcon_h1", "gemma3n_text", "deepseek_v4", "qwen3_vl_moe", "kimi_k25", "mistral_large4", "qwen3_next")
REQUIRED_SHARE = 0.95


def _one(family: str) -> Verdict:
    import torch

    torch.set_num_threads(1)
    return sweep_family(family, Path(tempfile.mkdtemp(prefix=f"sweep-{family}-")))


@pytest.fixture(scope="module")
def verdicts() -> dict[str, Verdict]:
    registered = sorted(families.registered())
    workers = min(2, os.cpu_count() or 1)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return {v.family: v for v in pool.map(_one, registered, chunksize=4)}


def test_the_sweep_passes_nearly_every_family_transformers_registers(verdicts: dict[str, Verdict], capsys) -> None:
    built = [v for v in verdicts.values() if v.status not in ("not built", "not runnable")]
    passing = [v for v in built if v.status == "pass"]
    unrunnable = sum(v.status == "not runnable" for v in verdicts.values())
    with capsys.disabled():
        print(f"\nfamily sweep: {len(passing)} passing / {len(built)} built / {len(verdicts)} registered "
              f"(decoder-only and image-text-to-text; {len(families.skipped())} encoder-decoder left out; "
              f"{unrunnable} whose own transformers model does not run on text)")
        for v in sorted(verdicts.values(), key=lambda v: (v.status == "pass", v.family)):
            if v.status != "pass":
                print(f"  {v.status:9s} {v.family}: {v.reason}")
    assert len(built) >= 0.9 * len(verdicts), "most registered families should build tiny and run"
    assert len(passing) >= REQUIRED_SHARE * len(built), [f"{v.family}: {v.reason}" for v in built if v.status != "pass"]


@pytest.mark.parametrize("family", NAMED)
def test_each_named_family_passes(verdicts: dict[str, Verdict], family: str) -> None:
    assert family in verdicts, f"{family} is no longer registered by transformers"
    assert verdicts[family].status == "pass", verdicts[family].reason
