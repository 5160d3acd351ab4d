"""jobs.quantize's command line: --config files under flags, every option from one table, --help
without heavy imports, and progress lines."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from jobs import quantize as cli
from pipeline.job.options import OPTIONS, JobOptions, job_settings
from pipeline.job.settings import format_size, parse_size
from checkpoints import write_llama_checkpoint
from pipeline.job.progress import Progress

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return write_llama_checkpoint(tmp_path_factory.mktemp("src") / "m", layers=2, hidden=64, intermediate=128,
                                  vocab=128, shards=1)


def test_config_file_sets_options_and_flags_win(src: Path, tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"model: {src}\nbits: 3\ngroup-size: 32\nmax_shard_size: 1MB\nexclude: ['down_proj']\n")
    assert cli.main(["--config", str(cfg), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "sinq 3-bit, group 32" in out and "(max 0.00 GB each)" in out and "12 matrices quantized, 11 tensors copied" in out
    assert cli.main(["--config", str(cfg), "--bits", "2", "--exclude", "nothing", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "sinq 2-bit, group 32" in out and "14 matrices quantized, 9 tensors copied" in out


def test_toml_config_and_unknown_keys(src: Path, tmp_path: Path, capsys) -> None:
    good = tmp_path / "job.toml"
    good.write_text(f'model = "{src}"\nmethod = "nf4"\ntiling = "2D"\ngroup_size = 32\n')
    assert cli.main(["--config", str(good), "--dry-run"]) == 0
    assert "nf4 4-bit, group 32, 2D tiling" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("bitz: 4\n")
    assert cli.main(["--config", str(bad), "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {bad}: unknown setting 'bitz'"


def test_progress_lines_are_throttled_but_the_last_is_always_shown() -> None:
    lines: list[str] = []
    p = Progress(total_units=50, total_bytes=50 * 10**6, workers=4, log=lines.append, min_interval=3600)
    for i in range(50):
        p.unit_done(f"model.layers.{i}", 10**6, f"w{i % 2}", 0.1)
    assert len(lines) == 2
    assert lines[0].startswith("[ 1/50") and lines[-1].startswith("[50/50 100.0%]") and "0/4 workers busy" in lines[-1]
    assert p.worker_summary() == "w0: 25, w1: 25"


def test_help_shows_every_option_with_its_default_without_importing_torch() -> None:
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "jobs.quantize", "--help"], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert not {"torch", "ray", "transformers"} & imported
    text = " ".join(proc.stdout.split())
    for o in OPTIONS:
        assert o.flag in text, o.flag
        if o.kind not in ("flag", "list") and o.default is not None:
            assert f"(default: {format_size(o.default) if o.kind == 'size' else o.default})" in text, o.key
    assert "--eval" in text and "--log-level" in text and "--version" in text


def test_version_is_the_package_version(capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"sinq-cluster {metadata.version('sinq-cluster')}"


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.key)
def test_every_option_reaches_its_place_in_the_job_options(option) -> None:
    value = {"int": 16, "float": 0.25, "size": "6MiB", "flag": True, "list": ["x"]}.get(option.kind, "text")
    if option.choices:  # not the default, and not a codebook that needs other bits
        value = next(c for c in option.choices if c != option.default and c not in ("nf4", "nf3"))
    extra = {"method": "asinq"} if option.part == "calibration" else {}  # read by A-SINQ only
    settings = job_settings({"model": "m", "out": "o", option.key.replace("_", "-"): value, **extra}, "job.yaml")
    opts = JobOptions.from_settings(settings)
    home = {"quant": opts.quant, "storage": opts.storage, "calibration": opts.calibration, "job": opts}[option.part]
    want = parse_size(value) if option.kind == "size" else tuple(value) if option.kind == "list" else value
    assert getattr(home, option.attr) == want


@pytest.mark.parametrize(("args", "expected"), [
    (["--bogus-flag"], "error: unrecognized arguments: --bogus-flag (see sinq-quantize --help)"),
    (["--bits", "-4"], "error: argument --bits: invalid choice: -4"),
    (["--workers", "-1"], "error: --workers must be at least 1, got -1"),
    (["--max-shard-size", "0"], "error: --max-shard-size must be at least 1, got 0"),
    (["--gpus-per-worker", "0"], "error: --gpus-per-worker must be above 0, got 0.0"),
    (["--include", "["], "error: --include '[' is not a regular expression (unterminated character set"),
])
def test_a_bad_flag_is_one_line_naming_it(args: list[str], expected: str, src: Path, tmp_path: Path, capsys) -> None:
    try:
        code = cli.main(["--model", str(src), "--out", str(tmp_path / "o"), "--dry-run", *args])
    except SystemExit as stop:  # argparse's own refusals exit from inside the parser
        code = stop.code
    assert code in (1, 2)
    err = capsys.readouterr().err.strip()
    assert err.startswith(expected) and "\n" not in err, err
