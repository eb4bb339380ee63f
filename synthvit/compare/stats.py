"""Mean ± std over seeds, and the rule that says when a difference between two models stands out of seed noise:
only where |difference of the means| > 2 x the std of the difference, sqrt(s1^2 + s2^2) (sample stds over seeds)."""
from __future__ import annotations

import math
from dataclasses import dataclass

NOISE_RULE = ("A difference is stated only where |difference of the seed means| > 2 x the std of the difference, "
              "sqrt(s1² + s2²) with s1, s2 the sample stds over seeds; otherwise it is 'within noise'.")
NO_SEEDS = ("One seed per cell: no difference can be told from noise (set `seeds: [0, 1, 2]` or more to test "
            "them); the differences below are those of single runs.")


@dataclass(frozen=True)
class MeanStd:
    """The mean of a metric over seeds, its sample std (None with one value) and the number of seeds."""
    mean: float
    std: float | None
    n: int


def mean_std(values) -> MeanStd | None:
    """Mean and sample std (ddof 1) of the values that are numbers (None and NaN left out); None if none are."""
    vals = [float(v) for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    if not vals:
        return None
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
    return MeanStd(mean, std, len(vals))


@dataclass(frozen=True)
class Difference:
    """Model a against model b on one metric (higher is better)."""
    a: MeanStd
    b: MeanStd

    @property
    def delta(self) -> float:
        return self.a.mean - self.b.mean

    @property
    def noise(self) -> float | None:
        """The std of the difference of the means, sqrt(s_a^2 + s_b^2); None when a side has one seed."""
        if self.a.std is None or self.b.std is None:
            return None
        return math.hypot(self.a.std, self.b.std)

    @property
    def verdict(self) -> str:
        """``a`` or ``b`` (which is higher, beyond 2 x noise), ``noise`` (within it) or ``unknown`` (one seed)."""
        if self.noise is None:
            return "unknown"
        if abs(self.delta) > 2 * self.noise:
            return "a" if self.delta > 0 else "b"
        return "noise"

    def text(self, metric: str, name_a: str, name_b: str) -> str:
        """E.g. ``defect IoU 0.4512 vs 0.3011: **vit-synthetic higher** by 0.1501 (> 2 x 0.0213)``."""
        head = f"{metric} {self.a.mean:.4f} vs {self.b.mean:.4f}"
        verdict, gap = self.verdict, abs(self.delta)
        if verdict == "unknown":
            return f"{head}: cannot be told from noise (one seed)"
        if verdict == "noise":
            return f"{head}: within noise ({gap:.4f} <= 2 x {self.noise:.4f})"
        return f"{head}: **{name_a if verdict == 'a' else name_b} higher** by {gap:.4f} (> 2 x {self.noise:.4f})"
