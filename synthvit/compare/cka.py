"""Linear CKA between the layers of two networks (Kornblith et al. 2019), with the unbiased minibatch HSIC
estimator of Nguyen, Raghu & Kornblith (2021), as used in Raghu et al. 2021, "Do Vision Transformers See Like
Convolutional Neural Networks?".

Per minibatch of n examples, each layer's features X (n, d) give a linear Gram matrix K = X X^T with its diagonal
set to zero; HSIC_1 (Song et al. 2012) is unbiased, so sums over minibatches converge to the population value:

    HSIC_1(K, L) = [tr(K L) + 1^T K 1 * 1^T L 1 / ((n-1)(n-2)) - 2/(n-2) * 1^T K L 1] / (n (n-3))
    CKA(X, Y)    = sum HSIC_1(K, L) / sqrt(sum HSIC_1(K, K) * sum HSIC_1(L, L))

The biased estimator (centred Grams, diagonals kept) overstates similarity at small n: independent features score
well above 0. Features are compared flattened (every position and channel), in float64.
"""
from __future__ import annotations

import torch


def gram(features: torch.Tensor) -> torch.Tensor:
    """(n, ...) features -> (n, n) linear Gram matrix with a zero diagonal, float64."""
    x = features.flatten(1).double()
    k = x @ x.T
    k.fill_diagonal_(0)
    return k


def hsic1(k: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC of every pair of Gram stacks: k (A, n, n), g (B, n, n) -> (A, B). Needs n >= 4."""
    n = k.shape[-1]
    if n < 4:
        raise ValueError(f"the unbiased HSIC estimator needs a minibatch of >= 4 examples, got {n}")
    trace = k.flatten(1) @ g.flatten(1).T  # tr(K L) = sum(K * L) for symmetric L
    sums = k.sum((1, 2))[:, None] * g.sum((1, 2))[None, :] / ((n - 1) * (n - 2))
    cross = k.sum(2) @ g.sum(1).T * (2.0 / (n - 2))  # 1^T K L 1 = (K 1) . (L 1)
    return (trace + sums - cross) / (n * (n - 3))


class MinibatchCKA:
    """Accumulates CKA between every layer of network A and every layer of network B over minibatches."""

    def __init__(self, layers_a: int, layers_b: int):
        self.xy = torch.zeros(layers_a, layers_b, dtype=torch.float64)
        self.xx = torch.zeros(layers_a, dtype=torch.float64)
        self.yy = torch.zeros(layers_b, dtype=torch.float64)

    def update(self, feats_a: list[torch.Tensor], feats_b: list[torch.Tensor]) -> None:
        ka = torch.stack([gram(f) for f in feats_a])
        kb = torch.stack([gram(f) for f in feats_b])
        self.xy += hsic1(ka, kb)
        self.xx += torch.diagonal(hsic1(ka, ka))
        self.yy += torch.diagonal(hsic1(kb, kb))

    def compute(self) -> torch.Tensor:
        """(layers_a, layers_b) CKA; NaN where a layer's self-HSIC is not positive (a constant layer)."""
        denom = torch.sqrt(self.xx.clamp(min=0)[:, None] * self.yy.clamp(min=0)[None, :])
        return torch.where(denom > 0, self.xy / denom, torch.full_like(self.xy, float("nan")))


def linear_cka(x: torch.Tensor, y: torch.Tensor, batch: int | None = None) -> float:
    """CKA of two feature sets of the same n examples, accumulated over minibatches of ``batch`` (default: all)."""
    batch = batch or x.shape[0]
    acc = MinibatchCKA(1, 1)
    for i in range(0, x.shape[0] - batch + 1, batch):
        acc.update([x[i:i + batch]], [y[i:i + batch]])
    return float(acc.compute()[0, 0])
