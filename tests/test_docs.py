"""The docs site: every public name has a reference entry and a docstring, and the site builds.

The API reference (``docs/reference/api.md``, ``docs/reference/integrations.md``) is a list of
mkdocstrings ``::: dotted.path`` entries rendered from the docstrings. These tests check that the
list and the package agree: each public name (``cluster_tracking.__all__`` but ``__version__``,
and the four integration classes) has exactly one entry that imports to that very object, and a
docstring as griffe (what mkdocstrings reads) sees it. The slow test builds the site with
``mkdocs build --strict`` as ``.ci/run`` does, and reads the generated CLI and API pages back. The
README tests hold what the README promises a newcomer: the two commands it opens with, and links
to pages that exist.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import cluster_tracking

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
API_PAGES = (DOCS / "reference" / "api.md", DOCS / "reference" / "integrations.md")
INTEGRATIONS = {
    "cluster_tracking.integrations.mlflow.MlflowSink",
    "cluster_tracking.integrations.wandb.WandbSink",
    "cluster_tracking.integrations.lightning.ClusterabilityCallback",
    "cluster_tracking.integrations.transformers.ClusterabilityTrainerCallback",
}
README_COMMANDS = (
    "```bash\n"
    'python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e ".[mlflow]"'
    " && .venv/bin/cluster-tracking demo\n"
    "bash .ci/run\n"
    "```\n"
)


def public_names() -> dict[str, Any]:
    """Every documented public name, dotted, and the object it imports to."""
    names = {
        f"cluster_tracking.{name}": getattr(cluster_tracking, name)
        for name in cluster_tracking.__all__
        if name != "__version__"
    }
    for dotted in sorted(INTEGRATIONS):
        names[dotted] = import_dotted(dotted)
    return names


def import_dotted(dotted: str) -> Any:
    """The object a dotted path names: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            value: Any = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            value = getattr(value, attribute)
        return value
    raise ImportError(dotted)


def api_entries(pages: tuple[Path, ...] = API_PAGES) -> list[str]:
    """The targets of the ``::: dotted.path`` entries of the reference pages, in order."""
    entries = []
    for page in pages:
        entries += re.findall(r"^::: ([\w.]+)\s*$", page.read_text(), flags=re.MULTILINE)
    return entries


def entries_by_name(entries: list[str]) -> dict[str, list[str]]:
    """For each public name, the entries that import to its object (by identity)."""
    names = public_names()
    found: dict[str, list[str]] = {name: [] for name in names}
    for entry in entries:
        value = import_dotted(entry)
        for name, public in names.items():
            if value is public:
                found[name].append(entry)
    return found


def test_every_public_name_has_exactly_one_reference_entry() -> None:
    found = entries_by_name(api_entries())
    missing = sorted(name for name, entries in found.items() if not entries)
    doubled = {name: entries for name, entries in found.items() if len(entries) > 1}
    assert not missing, f"public names without a ::: entry in docs/reference/: {missing}"
    assert not doubled, f"public names entered more than once: {doubled}"


def test_every_reference_entry_is_a_public_name() -> None:
    """An entry for a private or internal path documents an import path users must not rely on."""
    public = {id(value) for value in public_names().values()}
    stray = [entry for entry in api_entries() if id(import_dotted(entry)) not in public]
    assert not stray, f"reference entries that are not public names: {stray}"


def test_a_name_dropped_from_the_page_is_caught(tmp_path: Path) -> None:
    """The check above fails when an entry goes: it is not satisfied by construction."""
    page = tmp_path / "api.md"
    text = API_PAGES[0].read_text()
    page.write_text(text.replace("::: cluster_tracking.ClusterabilityTracker\n", ""))
    found = entries_by_name(api_entries((page, API_PAGES[1])))
    assert found["cluster_tracking.ClusterabilityTracker"] == []
    assert all(found[name] for name in found if name != "cluster_tracking.ClusterabilityTracker")


def griffe_docstrings(entries: list[str]) -> dict[str, str]:
    """The docstring of each entry as mkdocstrings renders it (griffe, with the docs' extension)."""
    griffe = pytest.importorskip("griffe", reason="the docs extra: pip install -e '.[docs]'")
    sys.path.insert(0, str(DOCS / "hooks"))
    try:
        from comment_docstrings import CommentDocstrings
    finally:
        sys.path.remove(str(DOCS / "hooks"))
    loader = griffe.GriffeLoader(
        search_paths=[str(ROOT)], extensions=griffe.load_extensions(CommentDocstrings())
    )
    loader.load("cluster_tracking")
    loader.resolve_aliases(external=False, implicit=False)
    docstrings = {}
    for entry in entries:
        obj = loader.modules_collection.get_member(entry)
        docstring = obj.docstring
        docstrings[entry] = docstring.value.strip() if docstring is not None else ""
    return docstrings


def test_every_reference_entry_has_a_docstring() -> None:
    docstrings = griffe_docstrings(api_entries())
    empty = sorted(entry for entry, text in docstrings.items() if not text)
    assert not empty, f"public names without a docstring: {empty}"


def test_the_docstring_check_sees_a_missing_docstring(tmp_path: Path) -> None:
    """The check reads the source: a public name whose docstring goes is reported."""
    griffe = pytest.importorskip("griffe", reason="the docs extra: pip install -e '.[docs]'")
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text(
        '#: Documented by its comment.\nKEYS = ("a",)\n\n'
        'def documented() -> None:\n    """Does a thing."""\n\n\n'
        "def undocumented() -> None:\n    pass\n"
    )
    sys.path.insert(0, str(DOCS / "hooks"))
    try:
        from comment_docstrings import CommentDocstrings
    finally:
        sys.path.remove(str(DOCS / "hooks"))
    module = griffe.load(
        "pkg",
        search_paths=[str(tmp_path)],
        extensions=griffe.load_extensions(CommentDocstrings()),
    )
    assert module["documented"].docstring.value == "Does a thing."
    assert module["KEYS"].docstring.value == "Documented by its comment."
    assert module["undocumented"].docstring is None


@pytest.mark.slow
def test_site_builds_strictly_with_generated_references(tmp_path: Path) -> None:
    """`mkdocs build --strict` as in .ci/run; the generated CLI and API pages hold their content."""
    pytest.importorskip("mkdocs", reason="the docs extra: pip install -e '.[docs]'")
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    cli = (site / "reference" / "cli.html").read_text()
    for command in ("cluster-tracking demo", "cluster-tracking audit", "cluster-tracking compare"):
        assert command in cli, command
    for option in ("--max-memory", "--trust-pickle", "--log-to-run", "--tracking-uri"):
        assert option in cli, option
    api = (site / "reference" / "api.html").read_text()
    api += (site / "reference" / "integrations.html").read_text()
    for entry in api_entries():
        assert f'id="{entry}"' in api, entry
    performance = (site / "performance" / "index.html").read_text()
    assert "paper MLP" in performance  # the committed benchmark results were included


def test_readme_opens_with_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert readme.startswith("# cluster-tracking\n\n" + README_COMMANDS)


def test_readme_links_to_pages_that_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(((?:docs/|CHANGELOG)[^)#]*)(?:#[^)]*)?\)", readme)
    assert len(targets) >= 10
    missing = sorted({target for target in targets if not (ROOT / target).is_file()})
    assert not missing, f"README links to missing files: {missing}"
