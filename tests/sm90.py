"""The Triton kernels built for an H100 (sm_90) by Triton's own compiler, with no GPU present, and
their machine code read back with the ``cuobjdump`` that ships with Triton.

Import this in a process where ``TRITON_INTERPRET`` is unset: the kernels' decorators read it at
import, and interpreted kernels cannot be compiled.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sinq_ops import kernels

TARGET = GPUTarget("cuda", 90, 32)
# Integer arguments the JIT sees as multiples of 16 on the 70B shapes; the rest vary.
_NOT_ALIGNED = {"iters", "groups", "words", "numel", "chunks", "step"}
_BOUNDS = {n: "fp32" for n in ("std_min", "std_max", "step_min", "step_max", "log_min", "log_max")}


@dataclass(frozen=True)
class Build:
    """One kernel specialisation as the launcher in ``sinq_ops.kernels`` makes it."""

    kernel: str
    dtype: str  # the weight's
    constexprs: dict
    num_warps: int = 4
    packed: str = "u8"  # the quantize kernel's word type

    @property
    def weight_elements(self) -> int:
        """Weight elements one program handles per trip of its hot loop (per step, when resident)."""
        c = self.constexprs
        if self.kernel in ("rows", "resident"):
            return c["BLOCK_R"] * c["BLOCK_C"]
        if self.kernel == "quantize":
            return c["BLOCK_P"] * c["PER_WORD"] * c["G"]
        if self.kernel == "stats":
            return c["BLOCK"]
        return 0


def _rows(dtype: str, block_r: int, block_c: int) -> Build:
    return Build("rows", dtype, {"STATS": True, "EVEN": True, "BLOCK_R": block_r, "BLOCK_C": block_c}, 8)


def _quantize(bits: int, per_word: int, block_p: int, group: int = 64, levels: int = 0, packed: str = "u8") -> Build:
    return Build("quantize", "fp16", {"G": group, "BLOCK_G": group, "BLOCK_P": block_p, "BITS": bits,
                                      "PER_WORD": per_word, "N_LEVELS": levels}, packed=packed)


# What the launchers choose for the Llama-70B shapes, whose tiles divide evenly into row blocks.
LLAMA_70B_BUILDS = {
    "sinkhorn rows, g64 fp16": _rows("fp16", 64, 64),
    "sinkhorn rows, g64 bf16": _rows("bf16", 64, 64),
    "sinkhorn rows, g128 fp16": _rows("fp16", 32, 128),
    "sinkhorn decision, g64": Build("tile", "fp32", {"BLOCK_C": 64}),
    "sinkhorn resident, 2D g64 bf16": Build("resident", "bf16", {"BLOCK_R": 64, "BLOCK_C": 64}, 4),
    "sinkhorn resident, 2D g128 fp16": Build("resident", "fp16", {"BLOCK_R": 128, "BLOCK_C": 128}, 16),
    "quantize, 4-bit g64": _quantize(4, 2, 64),
    "quantize, 4-bit g128": _quantize(4, 2, 32, group=128),
    "quantize, 3-bit g64": _quantize(3, 10, 32, packed="i32"),
    "quantize, nf4 g64": _quantize(4, 2, 32, levels=16),
    "statistics, fp16": Build("stats", "fp16", {"EVEN": True, "BLOCK": 4096}),
    "statistics, fp32": Build("stats", "fp32", {"EVEN": True, "BLOCK": 4096}),
}


def _signature(build: Build) -> dict[str, str]:
    w = f"*{build.dtype}"
    f32 = "*fp32"
    if build.kernel == "rows":
        sig = {"w_ptr": w, **{n: f32 for n in ("log_r_ptr", "log_r_out_ptr", "best_r_ptr", "row_std_ptr",
                                               "row_std_out_ptr", "log_c_ptr")},
               "flags_ptr": "*i32", "target_ptr": f32, "part_ptr": f32, "ext_ptr": f32,
               **{n: "i32" for n in ("K", "R", "C", "tiles_per_row", "chunks", "chunk_rows", "step")}, **_BOUNDS}
    elif build.kernel == "tile":
        sig = {"log_c_ptr": f32, "best_c_ptr": f32, "flags_ptr": "*i32", "target_ptr": f32, "best_imb_ptr": f32,
               "part_ptr": f32, "ext_ptr": f32, **{n: "i32" for n in ("R", "C", "chunks", "step", "iters")},
               **_BOUNDS, "tie_rtol": "fp32"}
    elif build.kernel == "resident":
        sig = {"w_ptr": w, "best_r_ptr": f32, "best_c_ptr": f32,
               **{n: "i32" for n in ("K", "R", "C", "tiles_per_row", "iters")}, **_BOUNDS, "tie_rtol": "fp32"}
    elif build.kernel == "quantize":
        sig = {"w_ptr": w, "r_ptr": f32, "inv_c_ptr": f32, "mid_ptr": f32, "packed_ptr": f"*{build.packed}",
               "scale_ptr": f32, "zero_ptr": f32,
               **{n: "i32" for n in ("K", "groups", "words", "tiles_per_row", "R")}, "max_code": "fp32",
               "min_range": "fp32"}
    else:
        sig = {"w_ptr": w, "out_ptr": f32, "numel": "i64"}
    return {**sig, **{name: "constexpr" for name in build.constexprs}}


_FUNCTIONS = {
    "rows": kernels._sinkhorn_rows_kernel, "tile": kernels._sinkhorn_tile_kernel,
    "resident": kernels._sinkhorn_resident_kernel, "quantize": kernels._quantize_kernel,
    "stats": kernels._stats_kernel,
}


def compile_for_h100(build: Build):
    """The compiled kernel; Triton's warnings are the caller's to turn into errors."""
    fn = _FUNCTIONS[build.kernel]
    sig = _signature(build)
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items()
             if t[0] in "*i" and n not in _NOT_ALIGNED}
    src = ASTSource(fn, sig, constexprs=build.constexprs, attrs=attrs)
    return triton.compile(src, target=TARGET, options={"num_warps": build.num_warps, **kernels._OPTIONS})


@dataclass(frozen=True)
class MachineCode:
    instructions: list[str]  # SASS in address order, without addresses and encodings
    registers: int  # per thread
    spilled_bytes: int  # local memory per thread: register spills


def machine_code(compiled, workdir: Path) -> MachineCode:
    cubin = workdir / f"{compiled.name}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    tool = str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    out = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    code = [(int(m.group(1), 16), m.group(2).strip()) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", out)]
    if [addr for addr, _ in code] != [16 * i for i in range(len(code))]:
        raise ValueError(f"{compiled.name}: expected one function of 16-byte instructions from address 0")
    usage = subprocess.run([tool, "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    regs, local = (int(re.search(rf"\b{key}:(\d+)", usage).group(1)) for key in ("REG", "LOCAL"))
    return MachineCode([ins for _, ins in code], regs, local)


def hot_loop(code: list[str]) -> list[str]:
    """The body of the longest loop (a branch back to an earlier instruction), or all of the code."""
    best: list[str] = code
    found = False
    for i, ins in enumerate(code):
        m = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", ins)
        if m and int(m.group(1), 16) // 16 < i:
            body = code[int(m.group(1), 16) // 16:i + 1]
            if not found or len(body) > len(best):
                best, found = body, True
    return best
