"""The README and the docs site: the site builds with `mkdocs build --strict` (broken links and anchors fail), the
README stays a short front door whose links work, the Layout page matches the package tree, and the generated CLI
reference names every command. The build takes a few seconds and needs no network."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "momentum_proxy"
README = REPO / "README.md"
LAYOUT = REPO / "docs" / "layout.md"
README_LIMIT = 12 * 1024


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site, built once for this module with `mkdocs build --strict` into a temporary folder."""
    pytest.importorskip("mkdocs", reason="the docs tools are the [docs] extra")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"), "-d", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def test_the_site_builds_strictly(site):
    for page in (
        "index.html",
        "cli/index.html",
        "api/index.html",
        "layout/index.html",
        "benchmarks/index.html",
        "tutorials/own-photos/index.html",
    ):
        assert (site / page).is_file(), page
    assert not (site / "hooks").exists(), "the build hook must not be published"


def test_the_readme_is_short():
    size = len(README.read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes; at most {README_LIMIT} (move detail into docs/)"


def relative_links(markdown: str) -> list[str]:
    """Targets of Markdown links and images that are not URLs or in-page anchors."""
    targets = re.findall(r"!?\[[^\]]*\]\(([^)\s]+)", markdown)
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def test_every_relative_link_in_the_readme_exists():
    links = relative_links(README.read_text())
    assert links, "the README should link into docs/"
    missing = [t for t in links if not (REPO / t.split("#")[0]).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def package_entries() -> set[str]:
    """Every module and every subpackage folder of momentum_proxy (a subpackage's __init__.py is its folder)."""
    entries = set()
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(REPO)
        if path.name == "__init__.py" and path.parent != PACKAGE:
            entries.add(f"{rel.parent.as_posix()}/")
        else:
            entries.add(rel.as_posix())
    return entries


def test_the_layout_page_lists_every_module():
    text = LAYOUT.read_text()
    listed = set(re.findall(r"`(momentum_proxy/[^`\s]*)`", text))
    missing = sorted(package_entries() - listed)
    assert not missing, f"docs/layout.md does not describe: {missing}"


def test_every_path_on_the_layout_page_exists():
    named = re.findall(
        r"`((?:momentum_proxy|tests|benchmarks|docs)/[^`\s]*|[\w.-]+\.(?:md|yml|txt))`", LAYOUT.read_text()
    )
    assert named
    gone = [p for p in named if not (REPO / p).exists()]
    assert not gone, f"docs/layout.md names paths that do not exist: {gone}"


def test_the_cli_reference_names_every_command(site):
    from momentum_proxy import cli

    html = (site / "cli" / "index.html").read_text()
    missing = [name for name in cli.COMMANDS if f'id="{name}"' not in html or f"mproxy {name}" not in html]
    assert not missing, f"the generated CLI reference lacks: {missing}"
    assert "usage: mproxy train" in html  # the --help text itself, not only headings


def public_names() -> dict[str, str]:
    """momentum_proxy's public API, {name: module}, read from __init__.py without importing the package."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_PUBLIC" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def test_the_api_page_documents_the_public_api():
    text = (REPO / "docs" / "api.md").read_text()
    names = public_names()
    assert names, "momentum_proxy/__init__.py should name its public API in _PUBLIC"
    missing = [f"{module}.{name}" for name, module in names.items() if f"::: {module}.{name}\n" not in text]
    assert not missing, f"docs/api.md does not document: {missing}"


def test_the_home_page_names_every_extra():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"].get("optional-dependencies", {})
    text = (REPO / "docs" / "index.md").read_text()
    missing = [e for e in extras if f"| `{e}` |" not in text]
    assert not missing, f"docs/index.md's install table lacks the extras {missing}"
