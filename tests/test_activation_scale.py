"""A-SINQ's activation scale (``sinq_ops.activation``) against the reference's ``compute_awq_scale`` and
its ``sinq_awq_l1`` quantization, run in the same process."""

from __future__ import annotations

import pytest
import torch

from matrices import heavy_tailed, llm_like
from oracle import Quantizer
from sinq.awq import compute_awq_scale

from sinq_ops import QuantConfig, quantize
from sinq_ops.activation import ALPHAS, candidate_scale, normalisation, search
from sinq_ops.rounding import decode, fake_uniform, round_uniform

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


def test_the_normalisation_computed_once_gives_what_computing_it_twice_gives() -> None:
    w = llm_like(256, 512, seed=7).half().float()
    x = _inputs(512, seed=3).reshape(-1, 512)
    sinkhorn = normalisation(w, CFG)
    scale = search(w, x, CFG, coarse=4, sinkhorn=sinkhorn)
    assert torch.equal(scale, search(w, x, CFG, coarse=4))
    shared = quantize(w, **CFG.to_dict(), activation_scale=scale, sinkhorn=sinkhorn).to_state_dict("w")
    alone = quantize(w, **CFG.to_dict(), activation_scale=scale).to_state_dict("w")
    assert shared.keys() == alone.keys() and all(torch.equal(shared[k], alone[k]) for k in shared)
    assert normalisation(heavy_tailed(128, 256, seed=0), CFG) is None  # the gate: no Sinkhorn, no search


def test_the_error_on_evenly_spaced_rows_is_the_whole_quantization_s_there_and_picks_as_well() -> None:
    w = llm_like(2048, 256, seed=4).half().float()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(512, 256, generator=g) * (1 + 5 * torch.rand(256, generator=g))
    x[:, :4] *= 20
    full = search(w, x, CFG)
    assert torch.equal(search(w, x, CFG, max_rows=2048), full)  # as many rows as it has: all of them
    sampled = search(w, x, CFG, max_rows=256)
    # the pick is the candidate whose whole-matrix quantization errs least on rows 0, 8, 16, ...
    keep = torch.arange(0, 2048, 8)
    candidates = [torch.ones(256)] + [candidate_scale(x.abs().mean(0), w.abs().mean(0), i / ALPHAS)
                                      for i in range(ALPHAS)]
    on_rows = [_output_error(x, w[keep], quantize(w, **CFG.to_dict(), activation_scale=s).dequantize()[keep])
               for s in candidates]
    assert torch.equal(sampled, candidates[on_rows.index(min(on_rows))])
    errors = [_output_error(x, w, quantize(w, **CFG.to_dict(), activation_scale=s).dequantize())
              for s in (full, sampled, torch.ones(256))]
    assert errors[1] <= 1.01 * errors[0] and errors[1] < 0.95 * errors[2]
    with pytest.raises(ValueError, match="max_rows must be at least 1"):
        search(w, x, CFG, max_rows=0)


def test_the_rounding_round_trip_in_place_is_decode_of_the_codes() -> None:
    x = torch.randn(64, 8, 64) * torch.rand(64, 8, 1)
    for zero_in_range in (False, True):
        want = decode(*round_uniform(x, 7, zero_in_range=zero_in_range), None)
        assert torch.equal(fake_uniform(x.clone(), 7, zero_in_range=zero_in_range), want)


@pytest.mark.parametrize("bad, message", [
    (dict(sinkhorn=(torch.ones(1, 128, 4), torch.ones(1, 4, 32))), "expected .*normalisation"),
    (dict(sinkhorn=(torch.ones(1, 128, 4), torch.ones(1, 4, 64)), column_scale=torch.ones(256)),
     "not with a column_scale"),
])
def test_a_given_normalisation_of_the_wrong_form_is_refused(bad: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        quantize(llm_like(128, 256, seed=1), **CFG.to_dict(), **bad)


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
