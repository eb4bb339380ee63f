"""The docs hold: every relative link in README.md, docs/*.md and BENCHMARKS.md reaches a file (and a heading, for
``#anchor`` links, by GitHub's slug rule), every repository file path the pages mention (``generate/schema.py``,
``configs/pretrain/demo.yaml``, ``python -m generate.backends.stylegan.convert``) exists, and the README stays a
short front page that opens with the two commands; the file tree of docs/layout.md names every module of each package
folder and nothing that is not there. Each checker is tested on a planted broken tree, so it can fail."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 150
FIRST_COMMANDS = ["make demo", "make test"]

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"(?<!\\)\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
# a repository file path: two or more components, a source/config/doc extension, no placeholders or globs
FILE_PATH = re.compile(r"(?<![\w./<{*-])((?:\.\./)*[A-Za-z_][\w.-]*(?:/[\w.-]+)+\.(?:py|sh|toml|ya?ml|md))(?![\w/*])")
MODULE = re.compile(r"(?:^|\s)-m\s+((?:generate|pretrain|finetune|synthvit|benchmarks)(?:\.\w+)*)")


def doc_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", root / "BENCHMARKS.md", *sorted((root / "docs").glob("*.md"))]


def split_blocks(text: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(prose lines, code-block lines) of a markdown text, each as (line number, line)."""
    prose, code, fenced = [], [], False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        (code if fenced else prose).append((n, line))
    return prose, code


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation but ``-`` and ``_`` removed, spaces
    to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"<[^>]+>", "", text.replace("`", "")).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, duplicates numbered ``-1``, ``-2`` as GitHub does."""
    prose, _ = split_blocks(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose:
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        k = seen.get(base, 0)
        seen[base] = k + 1
        out.add(base if k == 0 else f"{base}-{k}")
    return out


def link_problems(path: Path, root: Path) -> list[str]:
    """A line per relative link of ``path`` whose file or heading does not exist."""
    prose, _ = split_blocks(path.read_text(encoding="utf-8"))
    problems = []
    for n, line in prose:
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not ours to check
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(root)}:{n}: [{target}]"
            if not dest.exists():
                problems.append(f"{where}: no file {file_part}")
            elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
                problems.append(f"{where}: no heading #{anchor} in {dest.relative_to(root)}")
    return problems


def path_problems(path: Path, root: Path) -> list[str]:
    """A line per repository file path (in the text, inline code or a code block; not in an HTML comment) or ``-m``
    module of ``path`` that does not exist. Paths are from the repository root; a ``../`` path is from the page's
    folder."""
    text = re.sub(r"<!--.*?-->", lambda m: "\n" * m.group(0).count("\n"), path.read_text(encoding="utf-8"),
                  flags=re.S)  # a comment keeps its line count, so line numbers stay right
    prose, code = split_blocks(text)
    spans = [(n, m.group(2)) for n, line in prose for m in INLINE_CODE.finditer(line)] + code
    spans += [(n, LINK.sub("", INLINE_CODE.sub("", line))) for n, line in prose]  # bare paths in the text too
    problems = []
    for n, span in spans:
        for p in FILE_PATH.findall(span):
            base = path.parent if p.startswith("../") else root
            if not (base / p).exists():
                problems.append(f"{path.relative_to(root)}:{n}: `{p}` does not exist")
        for mod in MODULE.findall(span):
            rel = Path(*mod.split("."))
            if not ((root / rel).with_suffix(".py").exists() or (root / rel / "__init__.py").exists()):
                problems.append(f"{path.relative_to(root)}:{n}: module {mod} (python -m) does not exist")
    return problems


def readme_problems(readme: Path) -> list[str]:
    """The README's own rules: under README_MAX_LINES lines, its first code blocks are the two commands."""
    text = readme.read_text(encoding="utf-8")
    problems = []
    if len(text.splitlines()) > README_MAX_LINES:
        problems.append(f"{readme.name} has {len(text.splitlines())} lines; keep it under {README_MAX_LINES} "
                        f"(reference text belongs in docs/)")
    blocks, current, fenced = [], [], False
    for line in text.splitlines():
        if FENCE.match(line):
            if fenced:
                blocks.append("\n".join(current).strip())
                current = []
            fenced = not fenced
        elif fenced:
            current.append(line)
    if blocks[:len(FIRST_COMMANDS)] != FIRST_COMMANDS:
        problems.append(f"{readme.name} must open with the commands {FIRST_COMMANDS} as its first code blocks; "
                        f"found {blocks[:len(FIRST_COMMANDS)]}")
    return problems


@pytest.mark.parametrize("page", doc_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_resolve(page):
    assert not link_problems(page, ROOT), "\n".join(link_problems(page, ROOT))


@pytest.mark.parametrize("page", doc_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_file_paths_exist(page):
    assert not path_problems(page, ROOT), "\n".join(path_problems(page, ROOT))


def test_readme_is_a_short_front_page():
    assert not readme_problems(ROOT / "README.md"), "\n".join(readme_problems(ROOT / "README.md"))


def test_docs_has_a_page_per_stage_and_topic():
    pages = {p.stem for p in (ROOT / "docs").glob("*.md")}
    assert {"generate", "pretrain", "finetune", "compare", "data-formats", "storage", "configs", "benchmarks",
            "layout"} <= pages
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    unlinked = [p for p in sorted(pages) if f"docs/{p}.md" not in readme]
    assert not unlinked, f"README.md links no docs page for {unlinked}"


def test_slug_follows_github():
    assert slug("The shard contract") == "the-shard-contract"
    assert slug("`synthvit finetune`, `evaluate`, `predict`") == "synthvit-finetune-evaluate-predict"
    assert slug("Shards in object storage (`s3://`, `gs://`, `https://`)") == "shards-in-object-storage-s3-gs-https"
    assert slug("Generation speed (issue: foundation and procedural generator)") == \
        "generation-speed-issue-foundation-and-procedural-generator"


def test_checker_finds_planted_breakage(tmp_path):
    """The checks fail on a tree with a broken link, a broken anchor, moved file paths and a long README that does
    not open with the commands -- and pass on a good page and README."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "real.py").write_text("")
    (tmp_path / "docs" / "page.md").write_text("# A page\n\n## The shard contract\n\ntext\n")
    bad = tmp_path / "docs" / "bad.md"
    bad.write_text("# Bad\n\n[gone](missing.md) [anchor](page.md#no-such-heading) [ok](page.md#the-shard-contract)\n"
                   "See `pkg/moved.py` and `pkg/real.py`; [up](../pkg/real.py).\n\n"
                   "```bash\npython -m pkg.nothing --config configs/x/gone.yaml\n```\n"
                   "`[not a link](nowhere.md)` and [web](https://example.com/x.md)\n"
                   "Prose names pkg/also_gone.py too. <!-- a note on pkg/planned.py -->\n")
    found = link_problems(bad, tmp_path) + path_problems(bad, tmp_path)
    assert any("no file missing.md" in p for p in found)
    assert any("no heading #no-such-heading" in p for p in found)
    assert any("`pkg/moved.py` does not exist" in p for p in found)
    assert any("`configs/x/gone.yaml` does not exist" in p for p in found)
    assert any("`pkg/also_gone.py` does not exist" in p for p in found)
    assert not any("nowhere.md" in p or "example.com" in p or "real.py" in p or "planned" in p for p in found)
    assert not any("-m" in p for p in found)  # pkg is not one of the project's packages: not checked
    assert len(found) == 5, found

    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n```bash\nmake test\n```\n" + "line\n" * 200)
    assert len(readme_problems(readme)) == 2
    readme.write_text("# x\n\n```bash\nmake demo\n```\n\n```bash\nmake test\n```\n")
    assert readme_problems(readme) == []

    good = tmp_path / "docs" / "good.md"
    good.write_text("[page](page.md#the-shard-contract) `pkg/real.py` [up](../pkg/real.py)\n")
    assert link_problems(good, tmp_path) + path_problems(good, tmp_path) == []


def test_checker_finds_missing_module(tmp_path):
    page = tmp_path / "p.md"
    (tmp_path / "generate").mkdir()
    (tmp_path / "generate" / "__init__.py").write_text("")
    page.write_text("```bash\npython -m generate.nothing x\npython -m generate\n```\n")
    assert path_problems(page, tmp_path) == ["p.md:2: module generate.nothing (python -m) does not exist"]


def layout_rows(text: str) -> dict[str, str]:
    """folder -> its text, from the code block under "## Files" in docs/layout.md (a row starts at column 0)."""
    block = text.split("## Files", 1)[1].split("```", 2)[1]
    rows: dict[str, str] = {}
    folder = None
    for line in block.splitlines():
        m = re.match(r"^([\w./-]+/)\s+(.*)$", line)
        if m:
            folder = m.group(1)
            rows[folder] = m.group(2)
        elif folder and line.strip():
            rows[folder] += " " + line.strip()
    return rows


def layout_problems(root: Path) -> list[str]:
    """The file tree of docs/layout.md against the repository: every named module or folder exists under its row's
    folder, and every module of a package folder is named in its row."""
    rows = layout_rows((root / "docs" / "layout.md").read_text(encoding="utf-8"))
    problems = []
    for folder, text in rows.items():
        base = root / folder
        if not base.is_dir():
            problems.append(f"docs/layout.md: folder {folder} does not exist")
            continue
        for name in re.findall(r"(?<![\w./-])([\w-]+(?:\.py|/))(?![\w/])", text):
            if not any(base.rglob(name.rstrip("/"))):
                problems.append(f"docs/layout.md: {folder} names {name}, which is not under {folder}")
        if (base / "__init__.py").exists():
            named = set(re.findall(r"[\w-]+\.py", text))
            for module in sorted(p.name for p in base.glob("*.py") if p.name != "__init__.py"):
                if module not in named:
                    problems.append(f"docs/layout.md: {folder}{module} is not named in the {folder} row")
    return problems


def test_layout_page_lists_the_files():
    assert not layout_problems(ROOT), "\n".join(layout_problems(ROOT))


def test_layout_checker_finds_missing_and_unlisted(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    for f in ("__init__.py", "a.py", "new.py", "sub/deep.py"):
        (tmp_path / "pkg" / f).write_text("")
    (tmp_path / "docs" / "layout.md").write_text("# L\n\n## Files\n\n```\npkg/   a.py (x), sub/ (deep.py),\n"
                                                 "       gone.py\n```\n")
    assert layout_problems(tmp_path) == ["docs/layout.md: pkg/ names gone.py, which is not under pkg/",
                                         "docs/layout.md: pkg/new.py is not named in the pkg/ row"]
