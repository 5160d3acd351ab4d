"""What calibration keeps of a matrix's inputs: per-channel sums of |x| and a thinned token sample.

A site is one input that one or more matrices read (q/k/v read one; an expert's gate/up read the
tokens routed to it). Its statistics must not depend on how many workers ran the forward, so
they are kept per calibration shard (a fixed group of sequences) and merged in shard order: the
same float64 sums, added in the same order, and the same sample rows, whatever the cluster.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

SAMPLE_DTYPE = torch.bfloat16  # staged samples: activations' own range, half of float32's bytes


@dataclass
class SiteStats:
    """One site's statistics over some tokens: float64 sums of |x| per channel, the token count,
    and up to ``cap`` rows of the tokens seen, spread evenly over them (every ``stride``-th)."""

    cap: int
    sums: Tensor | None = None  # [channels] float64
    count: int = 0
    rows: list[Tensor] = field(default_factory=list)  # kept rows, float32, in token order
    stride: int = 1
    seen: int = 0  # tokens offered to the sample so far

    def add(self, x: Tensor) -> None:
        """Tokens ``x`` ``[tokens, channels]``, in calibration order."""
        if not x.shape[0]:
            return
        x = x.detach().float()
        part = x.abs().sum(0, dtype=torch.float64).cpu()
        self.sums = part if self.sums is None else self.sums + part
        self.count += x.shape[0]
        first = (-self.seen) % self.stride  # the next index that is a multiple of the stride
        kept = x[first::self.stride].cpu()
        self.seen += x.shape[0]
        if kept.shape[0]:
            self.rows.append(kept)
        while sum(r.shape[0] for r in self.rows) > 2 * self.cap:
            # Thin deterministically: keep every other row already kept, and take half as many from now on.
            self._thin()

    def _thin(self) -> None:
        offset, thinned = 0, []
        for r in self.rows:
            thinned.append(r[(-offset) % 2::2])
            offset += r.shape[0]
        self.rows = [r for r in thinned if r.shape[0]]
        self.stride *= 2

    def sample(self) -> Tensor:
        return torch.cat(self.rows) if self.rows else torch.empty(0, 0)


def merge(parts: list[SiteStats], cap: int) -> tuple[Tensor, Tensor] | None:
    """Shards' statistics of one site, in shard order, as (mean |x| float32 ``[channels]``, sample
    ``[<= cap, channels]`` in ``SAMPLE_DTYPE``, rows spread evenly over the shards' kept rows);
    None when no token reached the site (an expert the router never chose)."""
    parts = [p for p in parts if p.count]
    if not parts:
        return None
    sums = parts[0].sums.clone()
    for p in parts[1:]:
        sums += p.sums
    count = sum(p.count for p in parts)
    rows = torch.cat([p.sample() for p in parts])
    if rows.shape[0] > cap:
        rows = rows[torch.div(torch.arange(cap) * rows.shape[0], cap, rounding_mode="floor")]
    return (sums / count).float(), rows.to(SAMPLE_DTYPE)
