"""A job's options, and the one table that the settings files and the command line both come from.

``JobOptions`` is composed of the library's own ``QuantConfig`` and ``StorageOptions`` plus the
job's scheduling settings. ``OPTIONS`` names each setting once, with its help text and where it
lives; defaults come from the dataclasses and choices from ``sinq_ops.config``, so a new option
or default is written in one place and appears in ``--help``, in YAML/TOML keys and in the job.
Nothing here imports Ray or torch: parsing a settings file or answering ``--help`` is quick.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from sinq_ops.config import AUX_FORMATS, METHODS, SUPPORTED_BITS, TILINGS, QuantConfig, check_servable

from .calibration.options import CalibrationOptions
from ..io.storage import StorageOptions
from .settings import format_size, parse_size


# sinq: the reference's layout, every option; compressed-tensors: what vLLM and SGLang load natively.
OUTPUT_FORMATS = ("sinq", "compressed-tensors")


@dataclass(frozen=True)
class JobOptions:
    """Everything one quantize job needs to know; validated where each part is built."""

    model: str
    out: str
    quant: QuantConfig = field(default_factory=QuantConfig)
    output_format: str = "sinq"
    storage: StorageOptions = field(default_factory=StorageOptions)
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    workers: int | None = None  # quantize actors; None: one per GPU share, else one per CPU
    gpus_per_worker: float = 1.0
    cpus_per_worker: int = 1
    max_shard_size: int = 4 * 10**9
    worker_memory: int = 12 * 10**9  # pipeline.job.plan.DEFAULT_WORKER_MEMORY, without importing torch
    include_towers: bool = False
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    dry_run: bool = False
    overwrite: bool = False
    ray_address: str | None = None

    def __post_init__(self) -> None:
        # Lists from a settings file or argparse become tuples: options stay hashable and frozen.
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        for name, low in (("workers", 1), ("cpus_per_worker", 1), ("max_shard_size", 1), ("worker_memory", 1)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise ValueError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
        if self.output_format not in OUTPUT_FORMATS:
            raise ValueError(f"--format {self.output_format!r} is not supported; choose one of {', '.join(OUTPUT_FORMATS)}")
        if self.output_format == "compressed-tensors":
            check_servable(self.quant)
        if self.calibration.text is not None and not self.quant.calibrated:
            raise ValueError("--calibration is read by --method asinq only; drop it or pass --method asinq")
        if self.gpus_per_worker <= 0:
            raise ValueError(f"--gpus-per-worker must be above 0, got {self.gpus_per_worker}")
        for name in ("include", "exclude"):
            for pattern in getattr(self, name):
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ValueError(f"--{name} {pattern!r} is not a regular expression ({exc})") from None

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> "JobOptions":
        """From flat, already normalised settings (``bits``, ``endpoint_url``, ``workers``, ...)."""
        parts: dict[str, dict[str, Any]] = {"quant": {}, "storage": {}, "calibration": {}, "job": {}}
        for key, value in settings.items():
            option = OPTION_BY_KEY.get(key)
            if option is None:
                raise ValueError(f"unknown setting {key!r}")
            parts[option.part][option.attr] = value
        return cls(**parts["job"], quant=QuantConfig(**parts["quant"]), storage=StorageOptions(**parts["storage"]),
                   calibration=CalibrationOptions(**parts["calibration"]))


_PARTS = {"quant": QuantConfig, "storage": StorageOptions, "calibration": CalibrationOptions, "job": JobOptions}


@dataclass(frozen=True)
class Option:
    """One setting: its key in settings files (``group_size``; ``group-size`` also accepted), its
    flag, its home (attribute ``attr`` of ``part``) and help text. ``kind`` says how text becomes a value."""

    key: str
    help: str
    part: str = "job"
    attr: str = ""
    kind: str = "str"  # str, int, float, size, flag (true/false), list (repeatable)
    choices: tuple = ()
    flag: str = ""
    metavar: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "attr", self.attr or self.key)
        object.__setattr__(self, "flag", self.flag or "--" + self.key.replace("_", "-"))

    @property
    def default(self) -> Any:
        """The dataclass default of the field this option sets."""
        for f in dataclasses.fields(_PARTS[self.part]):
            if f.name == self.attr:
                if f.default is not dataclasses.MISSING:
                    return f.default
                if f.default_factory is not dataclasses.MISSING:
                    return f.default_factory()
        return None

    @property
    def convert(self) -> Callable[[str], Any]:
        return {"int": int, "float": float, "size": parse_size}.get(self.kind, str)


OPTIONS: tuple[Option, ...] = (
    Option("model", "source checkpoint: a local directory, an fsspec URL (s3://bucket/prefix), a Hub repo "
                    "org/name[@revision], or synthetic://NAME (default: SmolLM2-135M-Instruct)", metavar="SRC"),
    Option("out", "destination: a local directory or s3://bucket/prefix "
                  "(default: out/<model>-sinq-<bits>b-g<group>)", metavar="DST"),
    Option("bits", "bits per weight", "quant", kind="int", choices=SUPPORTED_BITS),
    Option("group_size", "weights per group scale and zero: a multiple of 8 that divides every quantized weight's "
                         "columns", "quant", kind="int"),
    Option("tiling", "1D (column blocks) or 2D (square tiles)", "quant", choices=TILINGS),
    Option("method", "sinq, rtn (plain round-to-nearest), nf4 or nf3 (SINQ with normal-float codebooks), or asinq "
                     "(A-SINQ: SINQ with an activation-aware column scale, calibrated on --calibration text)", "quant",
           choices=METHODS),
    Option("calibration", "with --method asinq: calibration text, a file (local, s3://, or a Hub dataset's file as "
                          "hf://datasets/ORG/NAME/FILE; .txt, or .jsonl with a text field) (default: "
                          "$SINQ_CALIBRATION_TEXT, else WikiText-2's validation split in ../shared/data)", "calibration",
           attr="text", metavar="SRC"),
    Option("calibration_sequences", "with --method asinq: calibration sequences run through the float model",
           "calibration", attr="sequences", kind="int", metavar="N"),
    Option("calibration_length", "with --method asinq: tokens per calibration sequence", "calibration",
           attr="length", kind="int", metavar="N"),
    Option("calibration_sample", "with --method asinq: tokens each matrix's search measures its output error on "
                                 "(its statistics come from all calibration tokens)", "calibration", attr="sample",
           kind="int", metavar="N"),
    Option("calibration_expert_sample", "with --method asinq: at most this many of the tokens routed to an expert "
                                        "for its search", "calibration", attr="expert_sample", kind="int",
           metavar="N"),
    Option("aux", "how group scales and zeros are stored: int8 (what SinqConfig produces) or fp16", "quant",
           choices=AUX_FORMATS),
    Option("format", "output layout: sinq (the reference's, loaded by its loader and ours) or compressed-tensors "
                     "(pack-quantized int codes that vLLM and SGLang serve natively; 4 or 8 bits, group 32, 64 or "
                     "128, column scales folded into the neighbouring tensors)", attr="output_format",
           choices=OUTPUT_FORMATS),
    Option("workers", "quantize actors (default: one per GPU share, else one per CPU)", kind="int", metavar="N"),
    Option("gpus_per_worker", "GPU share per actor; 0.5 packs two actors on one card", kind="float", metavar="F"),
    Option("cpus_per_worker", "CPU threads per actor", kind="int", metavar="N"),
    Option("max_shard_size", "largest output shard, e.g. 500MB, 2GiB", kind="size", metavar="SIZE"),
    Option("worker_memory", "memory one worker may plan for a unit (its source tensors, outputs and work space); "
                            "a decoder layer that needs more is split into units by groups of experts "
                            "(the default suits two workers on a 24 GB card)", kind="size", metavar="SIZE"),
    Option("include_towers", "also quantize the layers of a vision or audio tower (by default only the language "
                             "model's decoder layers are quantized)", kind="flag"),
    Option("include", "quantize only the model's tensors whose names match this regex (repeatable)", kind="list", metavar="REGEX"),
    Option("exclude", "leave the model's tensors whose names match this regex unquantized (repeatable)", kind="list", metavar="REGEX"),
    Option("dry_run", "print the plan (units, sizes, shards, memory per worker) and exit", kind="flag"),
    Option("overwrite", "replace a complete output of another job (model, config, tensor selection or tool version)",
           kind="flag"),
    Option("endpoint_url", "S3 endpoint (default: AWS_ENDPOINT_URL)", "storage", metavar="URL"),
    Option("profile", "AWS profile name for S3 credentials (default: the default profile)", "storage",
           metavar="NAME"),
    Option("upload_part_size", "object-store files larger than this go up as multipart uploads in parts of this "
                               "size (at least 5MiB)", "storage", attr="part_size", kind="size", metavar="SIZE"),
    Option("max_attempts", "attempts per object-storage request, with backoff, before a fault fails the job",
           "storage", kind="int", metavar="N"),
    Option("concurrency", "object-storage requests in flight per transfer: a unit's ranged reads, an upload's "
                          "parts, a shard's copies", "storage", kind="int", metavar="N"),
    Option("range_size", "the largest single ranged read from object storage", "storage", kind="size",
           metavar="SIZE"),
    Option("stream_assembly", "stream every shard byte through the reducer instead of letting the store copy the "
                              "staged units into place (for a store without UploadPartCopy)", "storage",
           kind="flag"),
    Option("ray_address", "Ray cluster to run on, e.g. HEAD:6379, or 'auto' for the one `ray start` began here "
                          "(default: RAY_ADDRESS, else a new local Ray)", metavar="ADDRESS"),
)
OPTION_BY_KEY = {o.key: o for o in OPTIONS}
# Older spellings that settings files may still use.
_ALIASES = {"part_size": "upload_part_size"}


def job_settings(mapping: dict[str, Any], label: str) -> dict[str, Any]:
    """Settings from a file: keys normalised (``group-size`` -> ``group_size``), unknown ones
    refused, sizes parsed; the error names ``label`` and the key."""
    out = {}
    for key, value in mapping.items():
        name = str(key).replace("-", "_")
        name = _ALIASES.get(name, name)
        if name not in OPTION_BY_KEY:
            raise ValueError(f"{label}: unknown setting {key!r}")
        if OPTION_BY_KEY[name].kind == "size":
            try:
                value = parse_size(value)
            except ValueError as exc:
                raise ValueError(f"{label}: {key}: {exc}") from None
        out[name] = value
    return out


def _help(option: Option) -> str:
    default = option.default
    if option.kind in ("flag", "list") or default is None:
        return option.help
    if option.kind == "size":
        default = format_size(default)
    return f"{option.help} (default: {default})"


def add_arguments(parser: Any, skip: tuple[str, ...] = ()) -> None:
    """Add a flag for every option to an ``argparse`` parser. Flags left out stay out of the parsed
    namespace (``SUPPRESS``), so the caller can lay them over a settings file and the defaults."""
    import argparse

    for o in OPTIONS:
        if o.key in skip:
            continue
        common: dict[str, Any] = {"dest": o.key, "help": _help(o), "default": argparse.SUPPRESS}
        if o.kind == "flag":
            parser.add_argument(o.flag, action="store_true", **common)
            continue
        if o.kind == "list":
            parser.add_argument(o.flag, action="append", metavar=o.metavar, **common)
            continue
        parser.add_argument(o.flag, type=_argparse_type(o, argparse), choices=o.choices or None, metavar=o.metavar,
                            **common)


def _argparse_type(option: Option, argparse: Any) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return option.convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = option.kind  # argparse names the type in its error message
    return convert
