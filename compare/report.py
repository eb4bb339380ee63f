"""``report.md`` and ``report.html`` (pictures beside them) from the finished cells, probes and analysis."""
from __future__ import annotations

import html
import json
import os
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

from synthvit.io import atomic_write_text

# (column, path into a cell's metrics.json or a model's probe.json, higher is better?)
CELL_METRICS = [("mIoU", ("pixel", "miou"), True), ("mDice", ("pixel", "mdice"), True),
                ("pixel AP", ("pixel", "defect_ap"), True), ("image AUROC", ("image", "auroc"), True),
                ("image AP", ("image", "ap"), True), ("accuracy", ("classification", "accuracy"), True)]
# "{frame}" is the probe's frame size (3840x2160 by default)
COSTS = [("params M", ("parameters",), False), ("GFLOPs/512 tile", ("gflops_per_512_tile",), False),
         ("{frame} s/frame", ("seconds_per_frame",), False), ("{frame} frames/s", ("frames_per_s",), True),
         ("train peak MB", ("train_peak_mb",), False), ("{frame} inference peak MB", ("inference_peak_mb",), False),
         ("train s", ("train_wall_s",), False)]


def dig(tree: dict | None, path: tuple[str, ...]):
    for key in path:
        if not isinstance(tree, dict) or tree.get(key) is None:
            return None
        tree = tree[key]
    return tree


def fmt(value) -> str:
    """Metrics (|x| <= 1) with 4 decimals; costs with 3 significant digits, thousands separated."""
    if value is None:
        return "—"
    if isinstance(value, float):
        if abs(value) <= 1:
            return f"{value:.4f}"
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


@dataclass
class Table:
    header: list[str]
    rows: list[list]
    better: list[bool | None] = field(default_factory=list)  # per column: higher better, lower better, or None

    def best(self) -> set[tuple[int, int]]:
        marks = set()
        for c, rule in enumerate(self.better):
            values = [(r, row[c]) for r, row in enumerate(self.rows) if isinstance(row[c], (int, float))]
            if rule is None or len(values) < 2:
                continue
            target = (max if rule else min)(v for _, v in values)
            marks |= {(r, c) for r, v in values if v == target}
        return marks


@dataclass
class Report:
    """Blocks rendered twice, as Markdown and HTML: ("h2", text), ("p", text), ("table", Table),
    ("img", file, alt), ("pre", summary, text)."""
    title: str
    blocks: list[tuple] = field(default_factory=list)

    def add(self, *block) -> None:
        self.blocks.append(block)

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, *args in self.blocks:
            if kind == "h2":
                out += [f"## {args[0]}", ""]
            elif kind == "p":
                out += [args[0], ""]
            elif kind == "img":
                out += [f"![{args[1]}]({args[0]})", ""]
            elif kind == "pre":
                out += [f"<details><summary>{args[0]}</summary>", "", "```yaml", args[1].rstrip(), "```", "",
                        "</details>", ""]
            elif kind == "table":
                t, best = args[0], args[0].best()
                out += ["| " + " | ".join(t.header) + " |", "|" + "---|" * len(t.header)]
                out += ["| " + " | ".join(f"**{fmt(v)}**" if (r, c) in best else fmt(v) for c, v in enumerate(row))
                        + " |" for r, row in enumerate(t.rows)]
                out.append("")
        return "\n".join(out)

    def html(self) -> str:
        css = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
               "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;"
               "padding:3px 7px;text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
               "b{color:#0a6}img{max-width:100%;border:1px solid #eee}pre{background:#f7f7f7;padding:8px;"
               "font-size:12px;overflow:auto}")
        out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
               f"<style>{css}</style></head><body><h1>{html.escape(self.title)}</h1>"]
        for kind, *args in self.blocks:
            if kind == "h2":
                out.append(f"<h2>{html.escape(args[0])}</h2>")
            elif kind == "p":
                out.append(f"<p>{_inline(args[0])}</p>")
            elif kind == "img":
                out.append(f"<p><img src='{html.escape(args[0])}' alt='{html.escape(args[1])}'></p>")
            elif kind == "pre":
                out.append(f"<details><summary>{html.escape(args[0])}</summary><pre>{html.escape(args[1])}</pre>"
                           f"</details>")
            elif kind == "table":
                t, best = args[0], args[0].best()
                out.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in t.header) + "</tr>")
                for r, row in enumerate(t.rows):
                    cells = (f"<b>{html.escape(fmt(v))}</b>" if (r, c) in best else html.escape(fmt(v))
                             for c, v in enumerate(row))
                    out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
                out.append("</table>")
        out.append("</body></html>")
        return "\n".join(out)

    def write(self, folder: Path) -> tuple[Path, Path]:
        md, page = folder / "report.md", folder / "report.html"
        atomic_write_text(md, self.markdown() + "\n")
        atomic_write_text(page, self.html() + "\n")
        return md, page


def _inline(text: str) -> str:
    """Markdown's **bold** and `code` for the HTML page."""
    import re

    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def environment() -> list[list]:
    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    rows = [["date", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")],
            ["machine", f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}"],
            ["GPU", torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)"],
            ["python", platform.python_version()]]
    rows += [[d, version(d)] for d in ("synthvit", "torch", "timm", "accelerate", "segmentation-models-pytorch",
                                       "torchmetrics", "webdataset", "captum")]
    return rows


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None
