"""A-SINQ in the compressed-tensors format: each activation scale searched under the constraint its
column scale obeys (shared by the readers of one input and searched on their lead, tied per
key/value head for an attention output), folded where the column scale folds; the output computes
what the same scales compute unfolded in memory."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.job.calibration.staged import load as load_stats
from pipeline.io.storage import Location
from pipeline.job.calibrate import CalibrationInput, run_calibration
from pipeline.job.options import JobOptions
from pipeline.job.plan import make_plan
from pipeline.job.run import run_job
from pipeline.job.served import SEARCH, _tied
from pipeline.loader import load_quantized
from pipeline.sources import open_source
from pipeline_checks import read_dir_tensors
from sinq_ops import QuantConfig
from sinq_ops.activation import search
from sinq_ops.columns import heads_scale_to_kv, shared_column_scale, tied_column_scale
from test_loading import TEXT, _word_tokenizer
from test_serving_format import _deq, _save

CONFIG = QuantConfig(bits=4, group_size=32, method="asinq")
G = CONFIG.group_size


def _searched(w: torch.Tensor, stats, leaf: str, scale: torch.Tensor, tie=None) -> torch.Tensor:
    mean, sample = stats.inputs(leaf)
    s = search(w, sample.float(), CONFIG, x_abs_mean=mean, **SEARCH, column_scale=scale, tie=tie,
               zero_in_range=True)
    return scale if s is None else scale / s


def test_served_asinq_computes_its_scales_unfolded_in_memory(tmp_path: Path) -> None:
    src, model = _save(tmp_path, "qwen3")
    _word_tokenizer(src)
    text = tmp_path / "calibration.txt"
    text.write_text(TEXT)
    settings = {"model": str(src), "out": str(tmp_path / "out"), "bits": 4, "group_size": 32, "method": "asinq",
                "format": "compressed-tensors", "calibration": str(text), "calibration_sequences": 4,
                "calibration_length": 32, "calibration_sample": 64}
    opts = JobOptions.from_settings(settings)
    manifest = run_job(opts, in_process=True, log=lambda _: None)
    plan = make_plan(open_source(opts.model), opts.quant, output_format="compressed-tensors")
    where = Location(str(tmp_path / "stats"))
    run_calibration(plan, opts, CalibrationInput(plan, opts), where, log=lambda _: None)
    out = tmp_path / "out"
    dtype = read_dir_tensors(out)["model.layers.0.mlp.down_proj.weight_scale"].dtype
    cfg = model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    ids = torch.randint(0, 24, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            stats = load_stats(where, f"model.layers.{i}")
            at, mlp, p = layer.self_attn, layer.mlp, f"model.layers.{i}"
            s_o = _searched(at.o_proj.weight, stats, f"{p}.self_attn.o_proj",
                            tied_column_scale(at.o_proj.weight, G, heads=heads, kv_heads=kv),
                            tie=lambda a: _tied(a, heads, kv))
            s_vrows = heads_scale_to_kv(s_o, heads=heads, kv_heads=kv)
            s_a = _searched(at.v_proj.weight, stats, f"{p}.self_attn.v_proj", shared_column_scale([at.v_proj.weight], G))
            v_rows = at.v_proj.weight * s_vrows[:, None]
            at.q_proj.weight.copy_(_deq(at.q_proj.weight, s_a, dtype))
            at.k_proj.weight.copy_(_deq(at.k_proj.weight, s_a, dtype))
            at.v_proj.weight.copy_(_deq(v_rows, s_a, dtype) / s_vrows[:, None])
            at.o_proj.weight.copy_(_deq(at.o_proj.weight, s_o, dtype))
            s_d = _searched(mlp.down_proj.weight, stats, f"{p}.mlp.down_proj", shared_column_scale([mlp.down_proj.weight], G))
            s_m = _searched(mlp.up_proj.weight, stats, f"{p}.mlp.up_proj", shared_column_scale([mlp.up_proj.weight], G))
            up_rows = mlp.up_proj.weight * s_d[:, None]
            mlp.gate_proj.weight.copy_(_deq(mlp.gate_proj.weight, s_m, dtype))
            mlp.up_proj.weight.copy_(_deq(up_rows, s_m, dtype) / s_d[:, None])
            mlp.down_proj.weight.copy_(_deq(mlp.down_proj.weight, s_d, dtype))
            # the searched scales are not the column scales alone: A-SINQ changed them
            assert not torch.equal(s_a, shared_column_scale([at.v_proj.weight], G))
        want = model(ids).logits
        got = load_quantized(str(out))(ids).logits
    assert (got - want).abs().max() < 2e-4 * want.abs().max(), (got - want).abs().max()
    activation = {s["name"]: s["activation"] for s in manifest["tensors"]}
    assert activation["model.layers.0.self_attn.v_proj.weight"] == "searched"
    assert activation["model.layers.0.self_attn.q_proj.weight"] == "shared: searched on v_proj"
    assert activation["model.layers.0.self_attn.o_proj.weight"] == "searched"
    assert activation["model.layers.1.mlp.gate_proj.weight"] == "shared: searched on up_proj"
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"
