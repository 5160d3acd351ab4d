"""Differential tests: sinq_ops against the reference package, run in the same process."""

from __future__ import annotations

import pytest
import torch

from matrices import heavy_tailed, llm_like
from oracle import reference_dequantize, reference_quantize
from sinq.quantizer import dq8
from sinq.sinkhorn import sinkhorn_log

from sinq_ops import QuantConfig, quantize, relative_error
from sinq_ops.config import KURTOSIS_GATE, SINKHORN_ITERS
from sinq_ops.rounding import NF3_LEVELS, NF4_LEVELS
from sinq_ops.sinkhorn import kurtosis, sinkhorn_scales

CONFIGS = [
    QuantConfig(bits=b, group_size=64, tiling=t, method=m, aux=a)
    for m, bit_list in (("sinq", (2, 3, 4, 5, 6, 8)), ("rtn", (2, 3, 4, 5, 6, 8)), ("nf4", (4,)), ("nf3", (3,)))
    for b in bit_list
    for t in ("1D", "2D")
    for a in ("int8", "fp16")
]
# Shapes and seeds of matrices whose tiles all get the same Sinkhorn choice from both sides.
SHAPES = [(384, 512, 3), (192, 640, 0), (640, 256, 0)]


def _cfg_id(c: QuantConfig) -> str:
    return f"{c.method}-{c.bits}b-{c.tiling}-{c.aux}"


def _tiles(w: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    n, k = w.shape
    g = cfg.group_size
    return w.view(1, n, k // g, g) if cfg.tiling == "1D" else w.view(n // g, g, k // g, g)


def _imbalance(x: torch.Tensor) -> float:
    r, c = x.std(1), x.std(0)
    return float(torch.maximum(r.max(), c.max()) / torch.minimum(r.min(), c.min()).clamp_min(1e-12))


def _tile_agreement(w: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """Per element: does its tile get the same Sinkhorn scaling from ours and the reference?

    Asserts on the way that every tile where they differ is one where ours is at least as
    balanced (a tie within float noise, or the final update that the reference never scores).
    """
    n, k = w.shape
    tiles = _tiles(w.half().float(), cfg)
    rows, cols = sinkhorn_scales(tiles, SINKHORN_ITERS)
    agree = torch.ones(tiles.shape, dtype=torch.bool)
    for i in range(tiles.shape[0]):
        for j in range(tiles.shape[2]):
            t = tiles[i, :, j, :]
            ref_scaled, ref_c, _ = sinkhorn_log(t, 16)
            ours_c = cols[i, j]
            if torch.allclose(ours_c, ref_c.reshape(-1), rtol=1e-4, atol=0):
                continue
            ours_scaled = t / ours_c / rows[i, :, j, None]
            assert _imbalance(ours_scaled) <= _imbalance(ref_scaled) * (1 + 1e-3), (i, j)
            agree[i, :, j, :] = False
    return agree.reshape(n, k)


def _reference_step(meta: dict, cfg: QuantConfig, ref: torch.Tensor) -> torch.Tensor:
    """Per element, the distance to a neighbouring reconstruction level of the reference.

    A neighbour is one code up or down, or, with 8-bit group scales and zeros, the group
    scale one step along its own 8-bit grid (which moves ``(q - z) * S1 * S2`` by
    ``|value| * d / S1``), plus the zero one step along the zero's grid.
    """
    n, k = meta["shape"]
    g = cfg.group_size

    def per_group(t: torch.Tensor) -> torch.Tensor:
        if cfg.tiling == "2D":
            t = t.reshape(n // g, k // g, g).permute(0, 2, 1)
        return t.reshape(n, k // g).repeat_interleave(g, 1)

    s1 = per_group((dq8(meta["scale"]) if cfg.aux == "int8" else meta["scale"]).float())
    s2 = meta["scale2"].float()
    s2 = s2.reshape(n // g, 1, k).expand(n // g, g, k).reshape(n, k) if cfg.tiling == "2D" else s2.reshape(1, k)
    step = (s1 * s2).abs()
    if cfg.codebook_name:
        levels = torch.tensor(NF4_LEVELS if cfg.method == "nf4" else NF3_LEVELS)
        step = step * (levels[1:] - levels[:-1]).max()
    if cfg.aux == "int8":
        x = meta["scale"]["x"] if isinstance(meta["scale"], dict) else meta["scale"][0]
        grid = meta["scale"]["s"] if isinstance(meta["scale"], dict) else meta["scale"][1]
        aux_step = per_group(grid.float().expand(x.shape).reshape(-1))
        zero_grid = float(meta["zero"]["s"] if isinstance(meta["zero"], dict) else meta["zero"][1])
        step = torch.maximum(step, ref.abs() * aux_step / s1.abs().clamp_min(1e-12)) + (s1 * s2).abs() * zero_grid
    return step


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
def test_dequantized_weights_match_reference(cfg: QuantConfig, shape: tuple[int, int, int]) -> None:
    w = llm_like(shape[0], shape[1], seed=shape[2])
    assert kurtosis(w) < KURTOSIS_GATE
    q = quantize(w, **cfg.to_dict())
    packed, meta = reference_quantize(w, cfg)
    ref = reference_dequantize(packed, meta)
    ours = q.dequantize()
    assert tuple(q.qweight.shape) == tuple(packed.shape)

    agree = _tile_agreement(w, cfg) if cfg.uses_sinkhorn else torch.ones_like(w, dtype=torch.bool)
    if cfg.aux == "int8":
        # 8-bit group scales share their grid across many tiles (a [32, -1] view), so one tile
        # with another Sinkhorn choice would move values everywhere: these matrices have none.
        assert bool(agree.all())
    assert agree.float().mean() >= 0.75
    _assert_codes_agree(ours, ref, _reference_step(meta, cfg, ref), agree)
    ours_err, ref_err = relative_error(w.half(), q), float((w.half().float() - ref).norm() / w.half().float().norm())
    assert ours_err <= ref_err * 1.001


def _assert_codes_agree(ours: torch.Tensor, ref: torch.Tensor, step: torch.Tensor, where: torch.Tensor) -> None:
    """At most 0.1% of the compared elements differ, and by no more than one step.

    Differences within float noise (a small part of a step, or an fp16 rounding of a scale)
    do not count as differing.
    """
    diff, noise = (ours - ref).abs()[where], 1.5e-3 * ref.abs()[where]
    differs = diff > 0.02 * step[where] + noise
    assert int(differs.sum()) <= 1e-3 * where.sum(), f"{int(differs.sum())} of {int(where.sum())} elements differ"
    worst = float(((diff - noise) / step[where]).max())
    assert worst <= 1.02, f"a value moved by {worst:.2f} steps"


@pytest.mark.parametrize("method", ["sinq", "nf4", "nf3"])
def test_kurtosis_gate_skips_sinkhorn_and_keeps_the_codebook(method: str) -> None:
    """Above the gate the reference quantizes without scaling; for NF methods it then stores
    uniform codes that its own decoder reads as codebook indices. Ours keeps the codebook."""
    w = heavy_tailed(256, 512, seed=3)
    assert kurtosis(w) > KURTOSIS_GATE
    bits = {"sinq": 4, "nf4": 4, "nf3": 3}[method]
    q = quantize(w, bits=bits, method=method, aux="fp16")
    assert not q.sinkhorn_applied
    w16 = w.half().float()
    # The same config without the Sinkhorn step: plain round-to-nearest or plain NF codes.
    plain = QuantConfig(bits=bits, method="rtn", aux="fp16") if method == "sinq" else None
    if plain is not None:
        ref = reference_dequantize(*reference_quantize(w, plain))
    else:
        from sinq.quantizer import Quantizer

        packed, meta = Quantizer.quantize(
            w16, None, nbits=bits, group_size=64, axis=1, device="cpu", method=method, compute_dtype=torch.float32,
        )
        meta["scale2"] = meta["scale2"].half()
        meta["scale"], meta["zero"] = meta["scale"].half(), meta["zero"].half()
        ref = reference_dequantize(packed, meta)
        gated_ref = reference_dequantize(*reference_quantize(w, QuantConfig(bits=bits, method=method, aux="fp16")))
        assert float((w16 - gated_ref).norm() / w16.norm()) > 1.0
    ours = q.dequantize()
    levels = {"sinq": None, "nf4": NF4_LEVELS, "nf3": NF3_LEVELS}[method]
    gap = 1.0 if levels is None else max(b - a for a, b in zip(levels, levels[1:]))
    step = q.scale.float().repeat_interleave(64, 0).reshape(w.shape).abs() * gap
    _assert_codes_agree(ours, ref, step, torch.ones_like(w, dtype=torch.bool))
    assert relative_error(w, q) < 0.5


def test_sinkhorn_scores_the_final_update() -> None:
    """Rows spread over e^9 need every one of the 16 updates; the reference never scores the
    last one, so its chosen scaling is less balanced than ours."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(64, 64, generator=g) * torch.exp(torch.linspace(0, 9, 64)).unsqueeze(1) * 1e-3
    t = t.half().float()
    rows, cols = sinkhorn_scales(t.view(1, 64, 1, 64), SINKHORN_ITERS)
    ours = _imbalance(t / cols[0, 0] / rows[0, :, 0, None])
    ref_scaled, _, _ = sinkhorn_log(t, 16)
    assert ours < _imbalance(ref_scaled) * 0.999


@pytest.mark.parametrize("tiling", ["1D", "2D"])
def test_sinkhorn_choices_differ_only_where_ours_is_as_balanced(tiling: str) -> None:
    """Where the imbalance reaches a plateau, float noise decides the reference's stopping
    step; ours treats near-ties as ties. Tiles may then differ, never to our detriment."""
    w = llm_like(384, 512, seed=11)
    cfg = QuantConfig(tiling=tiling, aux="fp16")
    agree = _tile_agreement(w, cfg)
    assert agree.float().mean() >= 0.75
    ref = reference_dequantize(*reference_quantize(w, cfg))
    w16 = w.half().float()
    assert relative_error(w, quantize(w, **cfg.to_dict())) <= float((w16 - ref).norm() / w16.norm()) * 1.001


def test_aux8_grid_matches_reference() -> None:
    """Our 8-bit group-scale and zero encoding against the reference's, on the same values."""
    from sinq.quantizer import rtn8

    from sinq_ops import aux8

    g = torch.Generator().manual_seed(5)
    scales = torch.rand(4096, 1, generator=g, dtype=torch.float32) * 0.01 + 1e-4
    zeros = torch.randint(0, 16, (4096, 1), generator=g).to(torch.float32)
    for values, tile in ((scales, 32), (zeros, zeros.numel())):
        ours = aux8.encode(values, tile)
        x, s, m, _ = rtn8(values.clone(), tile=tile)
        assert torch.equal(ours.codes, x) and torch.equal(ours.step, s) and torch.equal(ours.offset, m)
        assert torch.equal(ours.values(), (x * s + m).view(values.shape))
