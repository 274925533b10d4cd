"""The checkout itself: no stray files, every shipped picture shown, every man page listed,
and every pointer of the form <file>, "<section>" names a heading that exists.

Issue 19 items 6 and 7: the README's "More" list had left out linkus-web(8), docs/img
held screenshots no page showed, an empty file sat at the repo root, and comments sent
readers to README sections that had moved to docs/guide.md.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: <file>, "<section>" -- a Markdown file (or the README) and the quoted start of one of
#: its headings, where the quote may run over a line break of a comment or docstring.
POINTER = re.compile(r"(?P<file>(?:[\w.-]+/)*(?:README(?:\.md)?|[\w-]+\.md)),?\s+[\"“'](?P<section>[A-Z][^\"”'\n]*"
                     r"(?:\n[\s#*/]*[^\"”'\n]+)?)[\"”']")


def tracked_files() -> list[str]:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    listing = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True, timeout=30)
    return [name for name in listing.stdout.decode().split("\0") if name]


def headings(markdown: Path) -> set[str]:
    return {line.lstrip("#").strip().lower() for line in markdown.read_text(encoding="utf-8").splitlines()
            if line.startswith("#") and not line.startswith("#!")}


def man_pages() -> list[str]:
    return sorted(f"{path.stem}({path.suffix[1:]})" for path in (ROOT / "packaging" / "man").iterdir())


def test_the_readme_more_list_names_every_man_page() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    more = readme.split("\n## More\n", 1)[1].split("\n## ", 1)[0]
    assert len(man_pages()) >= 5
    assert [page for page in man_pages() if page not in more] == []


def test_every_picture_in_docs_img_is_shown_by_a_page() -> None:
    pages = "".join(path.read_text(encoding="utf-8") for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
    shown = set(re.findall(r"\]\((?:\.\./docs/|docs/)?img/([^)\s]+)\)", pages))
    pictures = {path.name for path in (ROOT / "docs" / "img").iterdir()}
    assert pictures, "docs/img is empty"
    assert sorted(pictures - shown) == []
    assert sorted(shown - pictures) == []  # and every picture a page shows is there


def test_no_empty_file_is_tracked_at_the_repo_root() -> None:
    empty = [name for name in tracked_files() if "/" not in name and (ROOT / name).stat().st_size == 0]
    assert empty == []


def test_every_pointer_to_a_section_names_a_heading_that_exists() -> None:
    broken, seen = [], 0
    for name in tracked_files():
        path = ROOT / name
        if path.suffix in (".png", ".gz") or name == "tests/test_repo_tidy.py":
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for match in POINTER.finditer(text):
            target = match["file"] if match["file"].endswith(".md") else match["file"] + ".md"
            section = " ".join(re.sub(r"^[\s#*/]+", "", part) for part in match["section"].split("\n"))
            seen += 1
            # a bare file name is the one next to the pointing file, else the one at the root
            candidates = [path.parent / target, ROOT / target]
            markdown = next((c for c in candidates if c.is_file()), None)
            if markdown is None or not any(h.startswith(section.lower()) for h in headings(markdown)):
                broken.append(f"{name}: {target}, {section!r}")
    assert seen >= 5  # the pattern still finds the pointers there are
    assert broken == [], broken


# -- issue 19 item 9: one copy of each test fake, and bench/ apart from the tests' fixtures -------------------


def test_the_clock_and_prompter_fakes_exist_once_in_tests_fakes() -> None:
    """A Clock or a Prompter (a class with ``ask``) is defined in tests/fakes.py and nowhere else in tests/."""
    import ast

    copies, found = [], set()
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ClassDef):
                continue
            methods = {item.name for item in node.body if isinstance(item, ast.FunctionDef)}
            if node.name == "Clock" or node.name.endswith("Prompter") or "ask" in methods:
                if path.name == "fakes.py":
                    found.add(node.name)
                else:
                    copies.append(f"{path.name}: class {node.name}")
    assert found == {"Clock", "Prompter"}
    assert copies == []


def test_bench_never_imports_the_tests_conftest() -> None:
    """bench/ may reuse helper modules of tests/ (servers, LogCatcher), never the pytest fixtures module:
    not directly, and not through a helper it imports."""
    import ast

    test_modules = {path.stem for path in (ROOT / "tests").glob("*.py")}
    bench_modules = {path.stem for path in (ROOT / "bench").glob("*.py")}
    imported = set()
    for path in (ROOT / "bench").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module.split(".")[0])
    from_tests = sorted((imported & test_modules) - bench_modules)
    assert "conftest" not in from_tests
    assert "ldap_server" in from_tests and "redis_server" in from_tests  # the scan still sees them
    probe = ("import importlib, sys\n"
             f"sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}, {str(ROOT / 'bench')!r}]\n"
             f"for name in {['harness', *from_tests]!r}:\n"
             "    importlib.import_module(name)\n"
             "print(sorted(name for name in sys.modules if name == 'conftest'))\n")
    import sys

    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"
