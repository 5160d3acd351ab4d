"""How an A-SINQ job calibrates: which text, how many sequences of how many tokens, and how many
tokens each matrix's search measures its error on.

Kept apart from the job's other options so that the calibration stage, the run key and the dry
run read one frozen, validated record.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

# WikiText-2's validation split beside the project (never the test split, which evaluation reads).
DEFAULT_TEXT = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "wikitext2_valid.txt"


def default_text() -> str:
    """``$SINQ_CALIBRATION_TEXT``, else WikiText-2's validation split beside the project."""
    return os.environ.get("SINQ_CALIBRATION_TEXT", str(DEFAULT_TEXT))


@dataclass(frozen=True)
class CalibrationOptions:
    """``text``: a text file (local path, ``s3://``, or a Hub dataset's file as
    ``hf://datasets/ORG/NAME/FILE``; ``.txt``, or ``.jsonl`` with a ``text`` field), None for
    ``default_text()``. ``sequences`` x ``length`` tokens go through the float model; each matrix's
    per-channel statistics come from all of them, its search's error from ``sample`` of them (an
    expert's from up to ``expert_sample`` of the tokens routed to it): statistics want many
    tokens, the error measure few (see bench/README.md)."""

    text: str | None = None
    sequences: int = 128
    length: int = 512
    sample: int = 512
    expert_sample: int = 128

    def __post_init__(self) -> None:
        for name, low in (("sequences", 1), ("length", 2), ("sample", 1), ("expert_sample", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"--calibration-{name.replace('_', '-')} must be an integer of at least {low}, "
                                 f"got {value!r}")

    @property
    def tokens(self) -> int:
        return self.sequences * self.length

    def resolved_text(self) -> str:
        return self.text if self.text is not None else default_text()

    def to_dict(self) -> dict:
        return asdict(self)
