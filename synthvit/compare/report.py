"""``report.md`` and ``report.html`` (pictures beside them) from the finished cells, probes and analysis."""
from __future__ import annotations

import html
import json
import math
import os
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

from synthvit.compare.stats import MeanStd
from synthvit.io import atomic_write_text


def _decimals(value: float) -> int:
    """Decimals :func:`fmt` shows: 4 for metrics (|x| <= 1), none from 100 on, else 3 significant digits."""
    if abs(value) <= 1:
        return 4
    return 0 if abs(value) >= 100 else max(2 - int(math.floor(math.log10(abs(value)))), 0)


def fmt(value) -> str:
    """Metrics (|x| <= 1) with 4 decimals; costs with 3 significant digits, thousands separated; a
    :class:`MeanStd` as ``mean ± std`` (the std with the mean's decimals; the mean alone for one seed)."""
    if value is None:
        return "—"
    if isinstance(value, MeanStd):
        return fmt(value.mean) + ("" if value.std is None else f" ± {value.std:,.{_decimals(value.mean)}f}")
    if isinstance(value, float):
        return f"{value:,.{_decimals(value)}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _number(value) -> float | None:
    """What :meth:`Table.best` compares: a number, or the mean of a :class:`MeanStd`."""
    if isinstance(value, MeanStd):
        return value.mean
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@dataclass
class Table:
    header: list[str]
    rows: list[list]
    better: list[bool | None] = field(default_factory=list)  # per column: higher better, lower better, or None

    def best(self) -> set[tuple[int, int]]:
        marks = set()
        for c, rule in enumerate(self.better):
            values = [(r, _number(row[c])) for r, row in enumerate(self.rows) if _number(row[c]) is not None]
            if rule is None or len(values) < 2:
                continue
            target = (max if rule else min)(v for _, v in values)
            marks |= {(r, c) for r, v in values if v == target}
        return marks


@dataclass
class Report:
    """Blocks rendered twice, as Markdown and HTML: ("h2", text), ("p", text), ("ul", [text, ...]),
    ("table", Table), ("img", file, alt), ("pre", summary, text)."""
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
            elif kind == "ul":
                out += [f"- {item}" for item in args[0]] + [""]
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
            elif kind == "ul":
                out.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in args[0]) + "</ul>")
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
