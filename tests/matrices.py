"""Random weight matrices with the structure of LLM weights, for numerical tests."""

from __future__ import annotations

import torch


def llm_like(n: int, k: int, seed: int, outliers: int = 3) -> torch.Tensor:
    """Uneven row and column scales and a few outlier columns, below the kurtosis gate."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g, dtype=torch.float32) * 0.02
    w *= torch.exp(torch.randn(n, 1, generator=g, dtype=torch.float32) * 0.12)
    w *= torch.exp(torch.randn(1, k, generator=g, dtype=torch.float32) * 0.12)
    w[:, torch.randperm(k, generator=g)[:outliers]] *= 2.5
    return w


def heavy_tailed(n: int, k: int, seed: int) -> torch.Tensor:
    """Strong outlier columns push the kurtosis well above the gate."""
    w = llm_like(n, k, seed, outliers=0)
    g = torch.Generator().manual_seed(seed + 1000)
    w[:, torch.randperm(k, generator=g)[: max(1, k // 64)]] *= 12.0
    return w
