"""The report's pictures (matplotlib, Agg backend): data efficiency, qualitative grid, saliency grid, CKA."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from synthvit.compare.config import ZERO_SHOT  # noqa: E402
from synthvit.io import atomic_write_bytes  # noqa: E402


def _save(fig, path: Path) -> Path:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def data_efficiency(series: dict[str, dict[str, list[tuple[int | str, float, float | None]]]], path: Path) -> Path:
    """``series[metric][model] = [(train images or "zero-shot", mean, std), ...]``: one panel per metric, one line
    per model with std error bars over seeds; a zero-shot value as a hollow diamond at "zero-shot", half the
    smallest budget (the x axis is logarithmic), joined to the model's line by a dotted segment."""
    metrics = [m for m in series if any(series[m].values())]
    fig, axes = plt.subplots(1, max(len(metrics), 1), figsize=(5.2 * max(len(metrics), 1), 3.8), squeeze=False)
    models = list(dict.fromkeys(m for metric in metrics for m in series[metric]))
    color = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(models)}  # one colour per model in every panel
    for ax, metric in zip(axes[0], metrics):
        points = series[metric]
        budgets = sorted({x for pts in points.values() for x, _, _ in pts if x != ZERO_SHOT})
        at_zero = min(budgets, default=2) / 2
        for i, (model, pts) in enumerate(points.items()):
            dodge = 1.03 ** (i - (len(points) - 1) / 2)  # side by side, so that error bars do not hide each other
            trained = sorted(p for p in pts if p[0] != ZERO_SHOT)
            if trained:
                xs, ys, err = zip(*trained)
                xs = [x * dodge for x in xs]
                ax.errorbar(xs, ys, yerr=[e or 0 for e in err], marker="o", capsize=3, label=model,
                            color=color[model])
            for _, y, _ in (p for p in pts if p[0] == ZERO_SHOT):
                ax.plot([at_zero * dodge], [y], marker="D", mfc="none", linestyle="none", color=color[model],
                        label=None if trained else model)
                if trained:
                    ax.plot([at_zero * dodge, xs[0]], [y, ys[0]], linestyle=":", color=color[model])
        zero = any(p[0] == ZERO_SHOT for pts in points.values() for p in pts)
        ticks = ([at_zero] if zero else []) + budgets
        ax.set_xscale("log")
        ax.set_xticks(ticks, ([ZERO_SHOT] if zero else []) + [str(b) for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("real training images")
        ax.set_ylabel(metric + " (mean ± std over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Data efficiency (test split, full resolution)")
    return _save(fig, path)


def _show(ax, image: np.ndarray, title: str = "") -> None:
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def _overlay(ax, image: np.ndarray, classes: np.ndarray, k: int) -> None:
    _show(ax, image)
    shown = np.ma.masked_where(classes == 0, classes)
    ax.imshow(shown, cmap="tab10", vmin=0, vmax=max(k, 10) - 1, alpha=0.55, interpolation="nearest")


def qualitative(crops, truths: list[np.ndarray | None], preds: dict[str, list], k: int, path: Path) -> Path:
    """Rows: crops; columns: image, ground truth, then each model's prediction (mask overlay or class)."""
    cols = 2 + len(preds)
    fig, axes = plt.subplots(len(crops), cols, figsize=(2.1 * cols, 2.2 * len(crops)), squeeze=False)
    for r, crop in enumerate(crops):
        _show(axes[r][0], crop.image, crop.source if r == 0 else "")
        axes[r][0].set_title(("image\n" if r == 0 else "") + crop.source, fontsize=7)
        if truths[r] is not None:
            _overlay(axes[r][1], crop.image, truths[r], k)
        else:
            _show(axes[r][1], crop.image)
        axes[r][1].set_title("ground truth" if r == 0 else "", fontsize=8)
        for c, (name, values) in enumerate(preds.items(), start=2):
            value = values[r]
            if isinstance(value, tuple):
                _show(axes[r][c], crop.image)
                axes[r][c].set_title((f"{name}\n" if r == 0 else "") + f"{value[0]} ({value[1]:.2f})", fontsize=7)
            else:
                _overlay(axes[r][c], crop.image, value, k)
                axes[r][c].set_title(name if r == 0 else "", fontsize=8)
    return _save(fig, path)


def saliency_grid(crops, maps: dict[str, tuple[str, np.ndarray]], path: Path) -> Path:
    """Rows: crops; columns: image, then each model's map (attention rollout for ViTs, Grad-CAM for CNNs)."""
    cols = 1 + len(maps)
    fig, axes = plt.subplots(len(crops), cols, figsize=(2.1 * cols, 2.2 * len(crops)), squeeze=False)
    for r, crop in enumerate(crops):
        _show(axes[r][0], crop.image, "image" if r == 0 else "")
        for c, (name, (kind, m)) in enumerate(maps.items(), start=1):
            _show(axes[r][c], crop.image)
            axes[r][c].imshow(m[r], cmap="jet", alpha=0.5, vmin=0, vmax=1)
            axes[r][c].set_title(f"{name}\n{kind}" if r == 0 else "", fontsize=7)
    return _save(fig, path)


def cka_heatmap(result: dict, path: Path) -> Path:
    m = result["cka"]
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    im = ax.imshow(m, origin="lower", cmap="magma", vmin=0, vmax=1, aspect="auto")
    ax.set_xlabel(f"{result['b']} layers")
    ax.set_ylabel(f"{result['a']} layers")
    step_a, step_b = max(len(result["layers_a"]) // 8, 1), max(len(result["layers_b"]) // 8, 1)
    ax.set_yticks(range(0, len(result["layers_a"]), step_a), result["layers_a"][::step_a], fontsize=6)
    ax.set_xticks(range(0, len(result["layers_b"]), step_b), result["layers_b"][::step_b], fontsize=6,
                  rotation=60)
    ax.set_title(f"{result['title']}\nlinear CKA (unbiased, minibatch)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)
