"""A-SINQ's activation scale (``sinq_ops.activation``) against the reference's ``compute_awq_scale`` and
its ``sinq_awq_l1`` quantization, run in the same process."""

from __future__ import annotations

import pytest
import torch

from matrices import heavy_tailed, llm_like
from oracle import Quantizer
from sinq.awq import compute_awq_scale

from sinq_ops import QuantConfig, quantize
from sinq_ops.activation import search

CFG = QuantConfig(bits=4, group_size=64, aux="fp16")


def _inputs(k: int, seed: int = 0) -> torch.Tensor:
    """[2, 64, k] calibration inputs with uneven channels, as a layer's inputs are."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 64, k, generator=g) * (1 + 5 * torch.rand(k, generator=g))


def _output_error(x: torch.Tensor, w: torch.Tensor, deq: torch.Tensor) -> float:
    return float((x @ (deq - w).t()).abs().mean())


def test_reference_candidates_give_the_reference_scale_and_quantization() -> None:
    w = llm_like(384, 512, seed=3).half().float()
    x = _inputs(512)
    ours = search(w, x.reshape(-1, 512), CFG, keep_sinq=False)
    want = compute_awq_scale(w, x, min_max=[0, 15], tile=64, method="sinq_awq_l1")
    assert torch.equal(ours, want)
    packed, meta = Quantizer.quantize(w, x, nbits=4, group_size=64, axis=1, device="cpu", tiling_mode="1D",
                                      method="sinq_awq_l1", compute_dtype=torch.float32)
    # as the reference's files hold them (fp16), as tests/oracle.py rounds them
    meta["scale2"], meta["scale"], meta["zero"] = meta["scale2"].half(), meta["scale"].half(), meta["zero"].half()
    ref = Quantizer.dequantize(packed, meta).float().reshape(w.shape)
    got = quantize(w, **CFG.to_dict(), backend="torch", activation_scale=ours).dequantize()
    assert torch.equal(got, ref)


def test_plain_sinq_is_a_candidate_so_the_search_never_ends_worse_than_it() -> None:
    w = llm_like(192, 640, seed=0).half().float()
    x = _inputs(640, seed=1).reshape(-1, 640)
    plain = quantize(w, **CFG.to_dict(), backend="torch").dequantize()
    reference = quantize(w, **CFG.to_dict(), backend="torch",
                         activation_scale=search(w, x, CFG, keep_sinq=False)).dequantize()
    ours = quantize(w, **CFG.to_dict(), backend="torch", activation_scale=search(w, x, CFG)).dequantize()
    assert _output_error(x, w, ours) <= min(_output_error(x, w, plain), _output_error(x, w, reference)) + 1e-7
    # here the reference's candidates all lose to plain SINQ, which it cannot choose
    assert _output_error(x, w, reference) > _output_error(x, w, plain)


def test_inputs_concentrated_on_few_channels_are_served_better_than_by_plain_sinq() -> None:
    w = llm_like(256, 512, seed=5).half().float()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(512, 512, generator=g)
    x[:, :8] *= 40  # a few channels carry most of the mass, as in a real layer's input
    plain = quantize(w, **CFG.to_dict(), backend="torch").dequantize()
    ours = quantize(w, **CFG.to_dict(), backend="torch", activation_scale=search(w, x, CFG)).dequantize()
    assert _output_error(x, w, ours) < 0.9 * _output_error(x, w, plain)


def test_a_matrix_the_kurtosis_gate_sends_to_rtn_gets_no_search() -> None:
    w = heavy_tailed(128, 256, seed=0)
    x = _inputs(256).reshape(-1, 256)
    assert search(w, x, CFG) is None
    ones = quantize(w, **CFG.to_dict(), backend="torch", activation_scale=torch.full((256,), 3.0)).dequantize()
    assert torch.equal(ones, quantize(w, **CFG.to_dict(), backend="torch").dequantize())


@pytest.mark.parametrize("bad, message", [
    (dict(inputs=torch.randn(4, 100)), "inputs must be [tokens, 256]"),
    (dict(config=QuantConfig(bits=4, group_size=64, tiling="2D")), "1D tiling"),
    (dict(objective="max"), "choose one of l1, l2"),
])
def test_bad_arguments_are_refused_naming_them(bad: dict, message: str) -> None:
    w = llm_like(128, 256, seed=1)
    args = {"inputs": torch.randn(4, 256), "config": CFG, **bad}
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        search(w, args.pop("inputs"), args.pop("config"), **args)
