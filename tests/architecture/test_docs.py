"""The docs name only what exists: every relative link (and its #anchor) in the Markdown pages, and
every repository path they quote in backticks, resolves in this checkout."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
PAGES = sorted([REPO / "README.md", REPO / "ARCHITECTURE.md", REPO / "tests" / "README.md", REPO / "bench" / "README.md",
                *(REPO / "docs").glob("*.md"), *(REPO / "docker").rglob("*.md")])
TOP = ("tasks/", "tests/", "docs/", "docker/", "bench/", "dags/", "plugins/", "templates/", ".ci/")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
QUOTED = re.compile(r"`([^`\s]+)`")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in page.read_text(encoding="utf-8").splitlines() if line.startswith("#")}


def problems(page: Path) -> list[str]:
    found = []
    text = page.read_text(encoding="utf-8")
    text_outside_code = re.sub(r"```.*?```", "", text, flags=re.S)
    for target in LINK.findall(text_outside_code):
        if re.match(r"^[a-z]+:", target):
            continue  # http(s), mailto: not this checkout's
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            found.append(f"{page.relative_to(REPO)}: link to {target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            found.append(f"{page.relative_to(REPO)}: link to {target}: no such heading")
    for quoted in QUOTED.findall(text):
        path = quoted.split("::")[0].rstrip(":,.")
        if path.startswith(TOP) and not re.search(r"[<>*{}$]|\.\.\.", path) and not (REPO / path).exists():
            found.append(f"{page.relative_to(REPO)}: names {quoted}, which does not exist")
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_and_path_in_the_docs_exists(page):
    assert problems(page) == []


def test_the_check_catches_a_dead_link_and_a_dead_path(tmp_path):
    page = REPO / "docs" / ".planted.md"
    try:
        page.write_text("[x](configuration.md#no-such-heading) [y](nowhere.md) `tasks/gone.py` `tasks/snapshot.py`\n")
        assert problems(page) == ["docs/.planted.md: link to configuration.md#no-such-heading: no such heading",
                                  "docs/.planted.md: link to nowhere.md: no such file",
                                  "docs/.planted.md: names tasks/gone.py, which does not exist"]
    finally:
        page.unlink()


def test_the_readme_is_a_front_door():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250
    linked = set(LINK.findall("\n".join(lines)))
    assert {f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")} <= linked
