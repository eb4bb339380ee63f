"""The report's numbers from :class:`compare.results.Row` s: the trade-off table, the every-cell table, the
data-efficiency series and the differences between models, each a mean ± std over seeds."""
from __future__ import annotations

from pathlib import Path

from synthvit.compare.analysis import Agreement
from synthvit.compare.report import Table
from synthvit.compare.results import Row
from synthvit.compare.stats import Difference, MeanStd, mean_std

# (column, Row attribute): higher is better for every one
# IoU and Dice at each run's fitted defect decision; "@argmax": the same at p(defect) > 0.5, for comparison
METRICS = [("mIoU", "miou"), ("defect IoU", "defect_iou"), ("defect IoU @argmax", "defect_iou_argmax"),
           ("mDice", "mdice"), ("pixel AP", "pixel_ap"),
           ("image AUROC", "image_auroc"), ("image AP", "image_ap"), ("accuracy", "accuracy")]
# (column, Row attribute, higher is better?): per cell, so mean ± std over seeds
TRAIN_COSTS = [("train peak MB", "train_peak_mb", False), ("train s", "train_s", False)]
# per model, from its probe ("{frame}": the probe's frame size, 3840x2160 by default)
PROBE_COSTS = [("params M", "params_m", False), ("GFLOPs/512 tile", "gflops_per_512_tile", False),
               ("{frame} s/frame", "s_per_4k_frame", False), ("{frame} frames/s", "frames_per_s", True),
               ("{frame} inference peak MB", "inference_peak_mb", False)]
# what the differences section tests, and the data-efficiency plot's panels
COMPARED = [("defect IoU", "defect_iou"), ("mIoU", "miou"), ("pixel AP", "pixel_ap"), ("image AUROC", "image_auroc")]
# the share of a scratch ViT's gap to a scratch CNN that synthetic data closes, on these
GAP_METRICS = [("defect IoU", "defect_iou"), ("pixel AP", "pixel_ap")]
MIXED, PRETRAINED = "mixed synthetic vs real only", "synthetic-pretrained vs scratch"


def budget_order(budget: int | str) -> int:
    """Zero-shot first, then the train-image counts ascending."""
    return -1 if isinstance(budget, str) else budget


def groups(rows: list[Row]) -> dict[tuple[str, int | str], list[Row]]:
    """(model name, budget) -> its rows (one per seed), models in the matrix's order, budgets ascending."""
    order = {n: i for i, n in enumerate(dict.fromkeys(r.name for r in rows if not r.zero_shot))}
    out: dict[tuple[str, int | str], list[Row]] = {}
    for r in sorted(rows, key=lambda r: (order.get(r.name, len(order)), budget_order(r.budget))):
        out.setdefault((r.name, r.budget), []).append(r)
    return out


def summary(rows: list[Row], attr: str) -> MeanStd | None:
    """Mean ± std of ``attr`` over the finished rows."""
    return mean_std(getattr(r, attr) for r in rows if r.done)


def largest(rows: list[Row]) -> dict[str, list[Row]]:
    """Per model: its finished rows at the largest train budget where any seed finished."""
    best: dict[str, list[Row]] = {}
    for (name, budget), rs in groups(rows).items():
        done = [r for r in rs if r.done]
        if done and not done[0].zero_shot:
            best[name] = done
    return best


def budget_unit_text(budget_unit: str) -> str:
    """What a budget counts, for the report: ``train images`` or ``defective train images``."""
    return "defective train images" if budget_unit == "defective" else "train images"


def tradeoff_table(rows: list[Row], agreement: dict[str, Agreement], frame: str,
                   unit: str = "train images") -> Table:
    header = ["model", "init", "task", "decoder", unit, "seeds"] + [c for c, _ in METRICS] + [
        c for c, _, _ in TRAIN_COSTS] + [c.format(frame=frame) for c, _, _ in PROBE_COSTS] + [
        "saliency AUROC", "saliency in mask"]
    body = []
    for name, rs in largest(rows).items():
        first, look = rs[0], agreement.get(name)
        init = ("synthetic" if first.init else "scratch") + (f" + mixed {first.synthetic}" if first.synthetic else "")
        body.append([name, init, first.task, first.decoder, first.budget,
                     len(rs)] + [summary(rs, a) for _, a in METRICS] + [summary(rs, a) for _, a, _ in TRAIN_COSTS]
                    + [getattr(first, a) for _, a, _ in PROBE_COSTS]
                    + [look.auroc if look else None, look.mass if look else None])
    better = [None] * 6 + [True] * len(METRICS) + [b for _, _, b in TRAIN_COSTS + PROBE_COSTS] + [True, True]
    return Table(header, body, better)


def _seeds_text(rs: list[Row]) -> str:
    if rs[0].zero_shot:
        return "1 (seed-independent)" if rs[0].done else "FAILED (see log.txt)"
    failed = [str(r.seed) for r in rs if not r.done]
    text = f"{len(rs) - len(failed)} of {len(rs)} done"
    return text + (f"; FAILED: seed {', '.join(failed)} (see log.txt)" if failed else "")


def cells_table(rows: list[Row], unit: str = "train images") -> Table:
    header = ["model", unit, "seeds"] + [c for c, _ in METRICS] + ["train s", "folder"]
    body = []
    for (name, budget), rs in groups(rows).items():
        folder = Path(rs[0].folder) if rs[0].zero_shot else Path(rs[0].folder).parent
        body.append([name, budget, _seeds_text(rs)] + [summary(rs, a) for _, a in METRICS]
                    + [summary(rs, "train_s"), str(folder)])
    return Table(header, body, [None] * (len(header)))


def series(rows: list[Row]) -> dict[str, dict[str, list[tuple[int | str, float, float | None]]]]:
    """``series[metric][model] = [(budget, mean, std), ...]`` for the data-efficiency plot (std None: one seed)."""
    out: dict[str, dict[str, list]] = {metric: {} for metric, _ in COMPARED}
    for (name, budget), rs in groups(rows).items():
        for metric, attr in COMPARED:
            s = summary(rs, attr)
            out[metric].setdefault(name, [])
            if s is not None:
                out[metric][name].append((budget, s.mean, s.std))
    return out


def by_name(rows: list[Row]) -> dict[str, Row]:
    """A row of each model (its last): what the pairings read of a model (model, init, family, synthetic)."""
    return {r.name: r for r in rows}


def compared_pairs(rows: list[Row]) -> list[tuple[str, str, str]]:
    """(a, b, why): each model with synthetic sets mixed into its batches against the same model, init and no
    sets; each synthetic-pretrained model against each scratch model of the same architecture mixing the same;
    then each ViT against each CNN."""
    info = by_name(rows)
    names = list(dict.fromkeys(r.name for r in rows if not r.zero_shot))
    mixed = [(a, b, MIXED) for a in names if info[a].synthetic
             for b in names if not info[b].synthetic and (info[b].model, info[b].init) == (info[a].model, info[a].init)]
    pretrained = [(a, b, PRETRAINED) for a in names if info[a].init
                  for b in names if not info[b].init and info[b].model == info[a].model
                  and bool(info[b].synthetic) == bool(info[a].synthetic)]
    return mixed + pretrained + [(a, b, "ViT vs CNN") for a in names if info[a].family == "vit"
                                 for b in names if info[b].family == "cnn"]


def gap_closed(a: list[Row], b: list[Row], cnn: list[Row]) -> str:
    """How much of scratch ViT ``b``'s gap to CNN ``cnn`` synthetic ViT ``a`` closes, on the seed means of
    :data:`GAP_METRICS`: (a - b) / (cnn - b), where the CNN is ahead."""
    parts = []
    for metric, attr in GAP_METRICS:
        sa, sb, sc = summary(a, attr), summary(b, attr), summary(cnn, attr)
        if not (sa and sb and sc):
            continue
        gap = sc.mean - sb.mean
        if gap <= 0:
            parts.append(f"{metric} no gap ({sb.mean:.4f} vs {sc.mean:.4f})")
            continue
        share = (sa.mean - sb.mean) / gap
        parts.append(f"{metric} {100 * share:+.0f} % of {gap:.4f}" + (" (past the CNN)" if share > 1 else
                                                                        " (wider)" if share < 0 else ""))
    return ", ".join(parts)


def difference_lines(rows: list[Row], unit: str = "train images") -> list[str]:
    """One line per compared pair and train budget that both models finished: each of :data:`COMPARED` that both
    have, as :meth:`Difference.text` words it; for a synthetic ViT against its scratch ViT, also the share of the
    scratch ViT's gap to each scratch CNN (no init, no mixed sets) of that budget that it closes."""
    by_cell, lines = groups(rows), []
    info = by_name(rows)
    cnns = [n for n, r in info.items() if r.family == "cnn" and not r.init and not r.synthetic]
    for a, b, why in compared_pairs(rows):
        for name, budget in by_cell:
            if name != a or isinstance(budget, str) or (b, budget) not in by_cell:
                continue
            ra, rb = by_cell[(a, budget)], by_cell[(b, budget)]
            tested = [(metric, summary(ra, attr), summary(rb, attr)) for metric, attr in COMPARED]
            parts = [Difference(sa, sb).text(metric, a, b) for metric, sa, sb in tested if sa and sb]
            if parts:
                seeds = f"{sum(r.done for r in ra)} vs {sum(r.done for r in rb)} seeds"
                lines.append(f"{a} vs {b} ({why}), {budget} {unit}, {seeds}: " + "; ".join(parts))
            if why == "ViT vs CNN" or info[a].family != "vit":
                continue
            for c in cnns:
                closed = gap_closed(ra, rb, by_cell.get((c, budget), []))
                if closed:
                    lines.append(f"{a}: the share of {b}'s gap to {c} it closes, {budget} {unit} (seed "
                                 f"means): {closed}")
    return lines


LEVER = [("pixel AP", "pixel_ap"), ("image AUROC", "image_auroc"), ("defect IoU", "defect_iou")]
VERDICT_WORDS = {"a": "better", "b": "worse", "noise": "within noise", "unknown": "one seed: no verdict"}


def lever_table(rows: list[Row], unit: str = "train images") -> Table | None:
    """The lever's answer: each model mixing synthetic sets against the same model without them (:data:`MIXED`), one
    row per budget both finished: per metric of :data:`LEVER` the two seed means, the difference, 2 x its noise and
    the verdict word (better / worse / within noise / one seed: no verdict); then predicted / true defect pixels of
    both at their decision. None without such a pair."""
    by_cell = groups(rows)
    header = ["mixed", "real only", unit, "seeds"]
    for metric, _ in LEVER:
        header += [f"{metric} mixed", f"{metric} real only", f"{metric} diff (2 std)", f"{metric} verdict"]
    header += ["pred/true px mixed", "pred/true px real only"]
    body = []
    for a, b, why in compared_pairs(rows):
        if why != MIXED:
            continue
        for (name, budget), ra in by_cell.items():
            if name != a or isinstance(budget, str) or (b, budget) not in by_cell:
                continue
            rb = by_cell[(b, budget)]
            line = [a, b, budget, f"{sum(r.done for r in ra)} vs {sum(r.done for r in rb)}"]
            for _, attr in LEVER:
                sa, sb = summary(ra, attr), summary(rb, attr)
                if not (sa and sb):
                    line += [sa, sb, None, "—"]
                    continue
                d = Difference(sa, sb)
                noise = f" ({2 * d.noise:.4f})" if d.noise is not None else ""
                line += [sa, sb, f"{d.delta:+.4f}{noise}", VERDICT_WORDS[d.verdict]]
            line += [summary(ra, "defect_pixel_ratio"), summary(rb, "defect_pixel_ratio")]
            body.append(line)
    return Table(header, body, [None] * len(header)) if body else None
