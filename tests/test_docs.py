"""The documentation holds together: README.md stays short, every relative link of README.md and docs/ resolves
(file and heading), every page is in the MkDocs nav, the developer guide names every module, and (where MkDocs is
installed: the `docs` extra, not CI) the site builds with `mkdocs build --strict`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """The text outside code: fenced blocks and inline code spans removed (links there are examples, not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def headings(text: str) -> list[str]:
    """The Markdown headings' plain text, outside code fences."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return [re.sub(r"[`*]", "", m) for m in re.findall(r"^#{1,6} (.+?)\s*$", text, re.M)]


def mkdocs_slug(title: str) -> str:
    """Python-Markdown's toc slugify, the anchors of the MkDocs site."""
    value = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode("ascii")
    value = re.sub(r"[^\w\s-]", "", value).strip().lower()
    return re.sub(r"[-\s]+", "-", value)


def github_slug(title: str) -> str:
    """GitHub's heading anchors (the same files read on GitHub)."""
    value = re.sub(r"[^\w\- ]", "", title.strip().lower())
    return value.replace(" ", "-")


def relative_links(path: Path) -> list[str]:
    return [
        href for href in LINK.findall(prose(path.read_text())) if not re.match(r"[a-z][a-z0-9+.-]*:", href)
    ]  # http:, https:, mailto: are not checked here


@pytest.mark.parametrize("path", [ROOT / "README.md", *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_to_a_file_and_heading(path: Path) -> None:
    broken = []
    for href in relative_links(path):
        target, _, anchor = href.partition("#")
        file = (path.parent / target).resolve() if target else path
        if not file.exists():
            broken.append(f"{href}: no file {file}")
            continue
        if ROOT not in file.parents and file != ROOT:
            broken.append(f"{href}: outside the repository")
            continue
        if anchor and file.suffix == ".md":
            titles = headings(file.read_text())
            if anchor not in {mkdocs_slug(t) for t in titles} or anchor not in {github_slug(t) for t in titles}:
                broken.append(f"{href}: no heading #{anchor} in {file.relative_to(ROOT)} (for MkDocs and GitHub)")
    assert not broken, "\n".join(broken)


def nav_pages(nav: list) -> list[str]:
    out = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        out.extend(nav_pages(value) if isinstance(value, list) else [value])
    return out


def test_every_docs_page_is_in_the_mkdocs_nav_and_every_nav_entry_exists() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["docs_dir"] == "docs" and config["theme"]["name"] == "material"
    nav = nav_pages(config["nav"])
    assert len(nav) == len(set(nav)), "a page is in the nav twice"
    pages = {str(p.relative_to(DOCS)) for p in PAGES}
    assert pages - set(nav) == set(), "pages missing from mkdocs.yml nav"
    assert set(nav) - pages == set(), "nav entries without a page"


def test_readme_is_short_and_has_no_dated_test_count() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    assert not re.search(r"\b\d[\d,]*\s+tests\b", text), "a test count in the README goes stale with every change"
    assert "../shared" not in text and "](docs/design.md)" in text


def test_every_module_of_the_package_is_named_in_the_developer_guides_package_layout() -> None:
    guide = (DOCS / "developer.md").read_text()
    layout = guide.split("## Package layout", 1)[1].split("```")[1]
    missing = []
    for module in sorted((ROOT / "dbconvert").rglob("*.py")):
        rel = module.relative_to(ROOT / "dbconvert")
        if module.name == "__init__.py" and len(rel.parts) > 1 and rel.parts[:-1] != ("families",):
            continue  # a sub-package's __init__ is named with its folder
        if len(rel.parts) == 1:
            ok = re.search(rf"^  {re.escape(module.name)}\b|, {re.escape(module.name)}\b", layout, re.M)
        else:  # named inside its folder's entry (the entry's line and its continuation lines)
            folder = rel.parts[-2] + "/"
            entry = re.search(rf"^( +){re.escape(folder)}.*(?:\n\1 +\S.*)*", layout, re.M)
            own = entry and re.search(rf"\b{re.escape(module.stem)}\.py\b", entry[0])
            path = re.search(rf"^ *{re.escape('/'.join(rel.parts[-2:]))}\b", layout, re.M)
            nested = (
                rel.parts[0] == "families"
                and len(rel.parts) == 2
                and re.search(rf"^    {re.escape(module.name)}\b", layout, re.M)
            )
            ok = own or path or nested
        if not ok:
            missing.append(str(rel))
    assert not missing, f"modules not named in docs/developer.md's package layout: {missing}"


def test_every_results_page_says_when_and_at_which_commit() -> None:
    for page in sorted((DOCS / "results").glob("*.md")):
        text = page.read_text()
        assert re.search(r"20\d\d-\d\d-\d\d", text) and "commit" in text.lower(), page.name


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert out.returncode == 0, out.stderr


def test_every_shipped_recipe_is_in_the_recipes_page() -> None:
    """Issue 33: the README's table once listed 7 of 11 recipes; docs/recipes.md names every shipped one."""
    from dbconvert.config import shipped_recipes

    page = (ROOT / "docs" / "recipes.md").read_text()
    missing = [name for name in shipped_recipes() if f"`{name}`" not in page]
    assert not missing, f"recipes not in docs/recipes.md: {missing}"


def test_the_one_line_descriptions_name_every_architecture() -> None:
    """The app's help and the package description list the five architectures (once: '(DiT, Llama)')."""
    import tomllib

    from dbconvert.cli.app import app

    description = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["description"]
    help_text = " ".join(str(app.info.help).split())
    for text in (description, help_text):
        for word in ("DiT", "ViT", "Llama", "masked-diffusion", "recurrent-depth"):
            assert word in text, (word, text)
