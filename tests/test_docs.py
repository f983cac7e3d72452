"""The documentation holds together: links resolve, the pages the code cites exist, the
README stays short enough to read."""

import re

import pytest
from helpers import REPO

PAGES = [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
CITED_PAGE = re.compile(r"\bdocs/[\w.-]+\.(?:md|json|png)")


def _slug(heading: str) -> str:
    # GitHub's anchors: lower case, punctuation dropped, spaces to hyphens
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    text = page.read_text()
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", dest.read_text(), flags=re.M)
            if anchor not in {_slug(h) for h in headings}:
                broken.append(target)
    assert not broken, f"{page.name}: broken links {broken}"


def _text_files():
    for pattern in ("abmll_tune/**/*.py", "recipes/*.py", "bench/**/*.py", "scripts/*.py",
                    "configs/*.yaml", "tests/*.py", "*.md", "docs/*.md", "Makefile",
                    "bench/**/*.sh"):  # fmt: skip
        yield from REPO.glob(pattern)


def test_every_docs_page_the_project_cites_exists():
    missing = {
        (f.relative_to(REPO).as_posix(), cited)
        for f in _text_files()
        for cited in CITED_PAGE.findall(f.read_text())
        if not (REPO / cited).exists()
    }
    assert not missing, sorted(missing)


def test_no_text_points_to_a_readme_section_that_moved():
    # the README's reference sections live in docs/ since 2026-12-06
    moved = re.compile(r'README,? "(Meta-training|Running recipes|GPU check|Real model|Data|'
                       r'Several GPUs|Performance|Adding a method|PEFT|Few-shot evaluation)')  # fmt: skip
    stale = [f.relative_to(REPO).as_posix() for f in _text_files() if moved.search(f.read_text())]
    assert not stale, stale


def test_the_readme_is_short_and_indexes_every_docs_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 350
    for page in sorted((REPO / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in readme, f"README does not link docs/{page.name}"


def test_the_table_generator_checks_every_page_as_documented():
    # README "Development": python -m abmll_tune.settings_tables (here with --check), from
    # the repository root, without PYTHONPATH
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-m", "abmll_tune.settings_tables", "--check"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_results_file_has_its_provenance_and_a_page_that_shows_it():
    import json

    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    text = "".join(p.read_text() for p in pages)
    files = sorted((REPO / "docs" / "results").glob("*.json"))
    assert len(files) >= 10
    for path in files:
        summary = json.loads(path.read_text())
        missing = [k for k in ("date", "commit", "command", "machine") if not summary.get(k)]
        assert not missing, f"{path.name} lacks {missing}"
        assert f"<!-- results: {path.stem} -->" in text, f"no page renders {path.name}"
