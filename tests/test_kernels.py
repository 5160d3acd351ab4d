"""The Triton kernels against the torch path.

Without a GPU they run under Triton's interpreter on the CPU; a separate test compiles them
for an H100 (sm_90) with Triton's own compiler, which the interpreter does not exercise.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from torch.profiler import ProfilerActivity, profile

from matrices import heavy_tailed, llm_like
from sinq_ops.memory import GPU_WORK_PER_FP16_BYTE

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated, at import
from sinq_ops import QuantConfig, kernels, quantize, relative_error  # noqa: E402
from sinq_ops.packing import unpack  # noqa: E402
from sinq_ops.quantize import _values  # noqa: E402
from sinq_ops.sinkhorn import kurtosis, sinkhorn_scales  # noqa: E402

if not ON_GPU:
    del os.environ["TRITON_INTERPRET"]
DEVICE = "cuda" if ON_GPU else "cpu"
ROOT = Path(__file__).resolve().parents[1]

CONFIGS = [
    QuantConfig(bits=4), QuantConfig(bits=3), QuantConfig(bits=4, group_size=128), QuantConfig(bits=3, group_size=128),
    QuantConfig(bits=4, tiling="2D"), QuantConfig(bits=3, tiling="2D", aux="fp16"),
    QuantConfig(bits=4, group_size=128, tiling="2D"),
    QuantConfig(bits=4, method="nf4"), QuantConfig(bits=3, method="nf3", tiling="2D"),
    QuantConfig(bits=2, aux="fp16"), QuantConfig(bits=5), QuantConfig(bits=6), QuantConfig(bits=8),
    QuantConfig(bits=4, method="rtn"), QuantConfig(bits=4, group_size=192),
]


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _codes(q) -> torch.Tensor:
    n, k = q.shape
    return unpack(q.qweight, q.config.bits, n * k // q.config.group_size).int()


def _assert_same_quantization(w: torch.Tensor, cfg: QuantConfig) -> None:
    """Within the tolerance of the reference-parity tests: at most 0.1% of codes differ, by one step."""
    ours = quantize(w, **cfg.to_dict(), backend="torch")
    fast = quantize(w.to(DEVICE), **cfg.to_dict(), backend="triton").to("cpu")
    assert fast.sinkhorn_applied == ours.sinkhorn_applied
    assert fast.qweight.dtype == ours.qweight.dtype and fast.qweight.shape == ours.qweight.shape
    diff = (_codes(fast) - _codes(ours)).abs()
    assert int(diff.max()) <= 1
    assert int((diff > 0).sum()) <= 1e-3 * diff.numel(), f"{int((diff > 0).sum())} of {diff.numel()} codes differ"
    torch.testing.assert_close(fast.scale2.float(), ours.scale2.float(), rtol=2e-3, atol=0)
    for name in ("scale", "zero"):
        a, b = _values(getattr(fast, name)), _values(getattr(ours, name))
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2 * float(b.abs().max()))
    assert relative_error(w.half(), fast) <= relative_error(w.half(), ours) * 1.001


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.method}-{c.bits}b-g{c.group_size}-{c.tiling}-{c.aux}")
def test_kernels_quantize_like_the_torch_path(interpret: None, cfg: QuantConfig) -> None:
    _assert_same_quantization(llm_like(256, 768, seed=11), cfg)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_weights_are_read_in_their_own_dtype(interpret: None, dtype: torch.dtype) -> None:
    """No fp16 copy: the kernels round each value to fp16 as they load it, as the torch path does up front."""
    _assert_same_quantization(llm_like(128, 512, seed=14).to(dtype), QuantConfig(bits=4))


def test_group_counts_that_leave_a_partial_packed_word(interpret: None) -> None:
    # 203 * 2 = 406 groups: the last 3-bit word holds 6 codes and 4 padding slots.
    _assert_same_quantization(llm_like(203, 128, seed=12), QuantConfig(bits=3))
    _assert_same_quantization(llm_like(203, 128, seed=12), QuantConfig(bits=2))


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_without_sinkhorn_codes_equal_the_torch_path_exactly(interpret: None, bits: int) -> None:
    """With unit scales both paths divide the same values by the same steps, so every code must
    agree, also for groups far from zero, where each code sits thousands of steps from the zero."""
    w = (10 + 0.05 * torch.randn(64, 512, generator=torch.Generator().manual_seed(19))).half()
    ours = quantize(w, bits=bits, method="rtn", backend="torch")
    fast = quantize(w.to(DEVICE), bits=bits, method="rtn", backend="triton").to("cpu")
    assert torch.equal(_codes(fast), _codes(ours))
    assert torch.equal(_values(fast.scale), _values(ours.scale)) and torch.equal(_values(fast.zero), _values(ours.zero))


def test_gated_matrix_skips_sinkhorn_on_both_paths(interpret: None) -> None:
    w = heavy_tailed(128, 512, seed=4)
    _assert_same_quantization(w, QuantConfig(bits=4))
    assert not quantize(w.to(DEVICE), backend="triton").sinkhorn_applied


@pytest.mark.parametrize("n, tiling, per_program", [
    (300, "1D", None), (300, "1D", 192), (300, "1D", 128), (300, "1D", 64), (48, "1D", None), (256, "1D", 128),
    (192, "2D", None), (192, "2D", 64),
])
def test_sinkhorn_kernel_matches_torch_scales(interpret: None, n: int, tiling: str, per_program: int | None) -> None:
    """Tall tiles streamed in row blocks (split over several programs, the last one partly filled,
    or all blocks full so that loads go unmasked) and small tiles kept in registers."""
    g = 64
    w = llm_like(n, 256, seed=13).half()
    rows = n if tiling == "1D" else g
    tiles = w.float().view(n // rows, rows, 256 // g, g)
    want_r, want_c = sinkhorn_scales(tiles, 16)
    got_r, got_c = kernels.sinkhorn_scales(w.to(DEVICE), rows, g, 16, rows_per_program=per_program)
    a, b = tiles.shape[0], tiles.shape[2]
    torch.testing.assert_close(got_r.cpu(), want_r.permute(0, 2, 1).reshape(a * b, rows), rtol=1e-4, atol=0)
    torch.testing.assert_close(got_c.cpu(), want_c.reshape(a * b, g), rtol=1e-4, atol=0)
    assert not torch.allclose(want_c, torch.ones_like(want_c))  # the tiles were really rescaled


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_weight_stats_kernel_matches_torch(interpret: None, dtype: torch.dtype) -> None:
    for w in (llm_like(96, 4100, seed=15), heavy_tailed(64, 4096, seed=16) + 0.3):  # partial block; non-zero mean
        w = w.to(dtype)
        lo, hi, kurt = kernels.weight_stats(w.to(DEVICE))
        assert (lo, hi) == tuple(float(v) for v in torch.aminmax(w))
        assert kurt == pytest.approx(kurtosis(w), rel=1e-4)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, running the kernel on the CPU, warns on NaN and Inf
@pytest.mark.parametrize("bad, message", [
    (float("nan"), "NaN or Inf"), (float("inf"), "NaN or Inf"), (-float("inf"), "NaN or Inf"), (7e4, "fp16 range"),
])
def test_triton_path_rejects_what_the_torch_path_rejects(interpret: None, bad: float, message: str) -> None:
    # In the last, partly filled block of the statistics kernel; then with every block full.
    for cols, col in ((4160, 4150), (4096, 10)):
        w = llm_like(64, cols, seed=17)
        w[50, col] = bad
        for backend in ("torch", "triton"):
            with pytest.raises(ValueError, match=message):
                quantize(w.to(DEVICE), backend=backend)


@pytest.mark.parametrize("cfg", [QuantConfig(bits=4), QuantConfig(bits=3, group_size=128), QuantConfig(bits=4, tiling="2D")],
                         ids=lambda c: f"{c.bits}b-g{c.group_size}-{c.tiling}")
def test_triton_path_allocates_within_the_planned_gpu_memory(interpret: None, cfg: QuantConfig) -> None:
    """What the planner budgets per GPU worker (``--dry-run``) covers what the kernels' path allocates."""
    w = llm_like(256, 768, seed=18).half().to(DEVICE)
    quantize(w, **cfg.to_dict(), backend="triton")  # warm caches outside the measurement
    if ON_GPU:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        quantize(w, **cfg.to_dict(), backend="triton")
        peak = torch.cuda.max_memory_allocated() - before
    else:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            quantize(w, **cfg.to_dict(), backend="triton")
        events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns())
        peak = int(torch.tensor([e.nbytes() for e in events]).cumsum(0).max())
    assert 0 < peak <= GPU_WORK_PER_FP16_BYTE * w.numel() * 2


def test_backend_errors_name_the_option() -> None:
    w = llm_like(64, 64, seed=1)
    with pytest.raises(ValueError, match=r"backend='cuda' is not supported"):
        quantize(w, backend="cuda")
    if not ON_GPU:
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            quantize(w, backend="triton")
        assert quantize(w).qweight.device.type == "cpu"  # auto picks torch for CPU tensors


def test_kernels_compile_for_h100(tmp_path: Path) -> None:
    """Triton's compiler (not the interpreter) builds every kernel, as launched for the Llama-70B
    shapes, to sm_90 machine code with no Triton warnings and no register spills."""
    script = textwrap.dedent("""
        import sys
        from pathlib import Path
        from sm90 import LLAMA_70B_BUILDS, compile_for_h100, machine_code
        for name, build in LLAMA_70B_BUILDS.items():
            code = machine_code(compile_for_h100(build), Path(sys.argv[1]))
            print(f"{name}|{len(code.instructions)}|{code.spilled_bytes}")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    out = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", script, str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    built = {name: (int(size), int(spilled)) for name, size, spilled in (line.split("|") for line in out.stdout.splitlines())}
    assert {name.split(",")[0] for name in built} == {"sinkhorn rows", "sinkhorn decision", "sinkhorn resident",
                                                       "quantize", "statistics"}
    assert all(size > 0 for size, _ in built.values())
    assert {name: spilled for name, (_, spilled) in built.items() if spilled} == {}
