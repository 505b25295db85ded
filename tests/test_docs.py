"""The documentation: the README as PyPI shows it, and the mkdocs site in ``docs/`` built with warnings as errors.

The README is the package's description on PyPI, where a relative link leads nowhere: every link in it is
absolute. The site is built by ``mkdocs build --strict`` (``mkdocs.yml`` makes broken links between pages,
missing anchors and pages left out of the navigation warnings, so errors here), which also renders the API
pages from the docstrings. When the README was cut down to what users need (issue 30), every section it had
moved to a page of the site; ``OLD_README_SECTIONS`` keeps that promise checked.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
BUILD_LIMIT_S = 120
"""One ``mkdocs build``: about 2.5 s on 2 cores (griffe reads the package's source, it imports nothing)."""
REPOSITORY = "https://github.com/anorag/anorag-integrations/"
"""Where the README's links to the repository's files point (pyproject's ``[project.urls]``)."""

OLD_README_SECTIONS = (
    "Quick start",
    "Using the router",
    "LangChain: `ChatVLLMRouted`",
    "LlamaIndex: `VLLMRouted`",
    "Embeddings",
    "The seed's provider API (`providers/`)",
    "config.yaml",
    "Several models",
    "Advanced routing (off by default)",
    "Prefix-aware routing",
    "Failover rules",
    "Running many replicas",
    "Observability",
    "CLI",
    "Tests",
    "Notebooks",
    "Cassettes",
    "Benchmarks",
)
"""Every ``## `` heading of the README before it became a user's page (at 720b77e): each is a heading in docs/."""

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)")
"""An inline Markdown link or image: ``[text](target)``, ``![alt](target)``; group 1 is the target."""
REFERENCE = re.compile(r"(?m)^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
"""A reference definition: ``[name]: target``."""
HTML_LINK = re.compile(r"""(?:href|src)\s*=\s*["']([^"']+)["']""")
HEADING = re.compile(r"(?m)^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$")
FENCE = re.compile(r"(?ms)^(```|~~~).*?^\1")


def link_targets(markdown: str) -> list[str]:
    """Every link target in ``markdown`` outside fenced code blocks (inline, reference, HTML)."""
    text = FENCE.sub("", markdown)
    return [m.group(1) for pattern in (LINK, REFERENCE, HTML_LINK) for m in pattern.finditer(text)]


def headings(markdown: str) -> set[str]:
    return {m.group(1) for m in HEADING.finditer(FENCE.sub("", markdown))}


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    """``mkdocs build --strict`` of ``config`` into ``site``, run at the repository root (the README snippet's base)."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's banner about MkDocs 2.0, on stderr
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config), "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=BUILD_LIMIT_S,
    )


def test_every_readme_link_is_absolute() -> None:
    """PyPI renders the README away from the repository: a relative link or a bare ``#anchor`` is broken there."""
    targets = link_targets(README.read_text())
    assert len(targets) > 10, "the link pattern found too little: is it still Markdown?"
    relative = [t for t in targets if not t.startswith("https://")]
    assert not relative, f"README.md links that break on PyPI (make them {REPOSITORY}blob/main/<path>): {relative}"
    ours = [t for t in targets if t.startswith(REPOSITORY)]
    assert all(re.match(re.escape(REPOSITORY) + r"(blob|tree)/main/", t) for t in ours), ours


def test_the_readme_links_to_files_that_exist() -> None:
    """An absolute link to the repository's own files is only checked here (the site build never sees them)."""
    prefix = re.compile(re.escape(REPOSITORY) + r"(?:blob|tree)/main/([^#?]+)")
    missing = [
        target
        for target in link_targets(README.read_text())
        if (m := prefix.match(target)) and not (ROOT / m.group(1)).exists()
    ]
    assert not missing, f"README.md links to files the repository lacks: {missing}"


def test_every_section_of_the_old_readme_is_a_heading_in_docs() -> None:
    found = set().union(*(headings(page.read_text()) for page in DOCS.rglob("*.md")))
    lost = [section for section in OLD_README_SECTIONS if section not in found]
    assert not lost, f"sections of the old README with no heading in docs/: {lost}"


def test_the_site_builds_with_warnings_as_errors(tmp_path: Path) -> None:
    """The whole site, API pages included; a warning of any kind fails the build and is shown here."""
    site = tmp_path / "site"
    result = mkdocs_build(ROOT / "mkdocs.yml", site)
    assert result.returncode == 0, result.stderr[-4000:]
    troubleshooting = (site / "troubleshooting" / "index.html").read_text()
    assert "RouterClosed" in troubleshooting, "the README's troubleshooting section was not included"
    router_page = (site / "api" / "router" / "index.html").read_text()
    assert 'id="anorag_integrations.router.Router.chat"' in router_page, "no API page generated from the docstrings"
    for name in ("grafana-dashboard.json", "bench_sweep_local.png", "compare_providers.png"):
        assert (site / name).exists(), name


def test_a_broken_link_between_pages_fails_the_build(tmp_path: Path) -> None:
    """What the strict build above guards against: ``mkdocs.yml``'s validation settings make it a failure.

    Built from a copy of docs/ with one bad link and one bad anchor, without the API plugin (not under test).
    """
    docs = tmp_path / "docs"
    shutil.copytree(DOCS, docs)
    page = docs / "models.md"
    page.write_text(page.read_text() + "\nSee [the gone page](no-such-page.md) and [a gone part](routing.md#no-such)\n")
    config = tmp_path / "mkdocs.yml"
    config.write_text(f"INHERIT: {ROOT / 'mkdocs.yml'}\ndocs_dir: {docs}\nplugins: [search]\n")
    result = mkdocs_build(config, tmp_path / "site")
    assert result.returncode != 0
    assert "no-such-page.md" in result.stderr and "#no-such" in result.stderr, result.stderr[-4000:]
