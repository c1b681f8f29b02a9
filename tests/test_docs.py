"""The documentation site: it builds with warnings as errors, every public name has its API
entry, the command-line reference lists every option, and the pages' Python code runs."""

import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

import swats_jax
from train import cifar

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# A ```python block runs unless the line before it is this comment (with its reason).
NOT_RUN = re.compile(r"<!-- not run: .+ -->\s*$")
FENCE = re.compile(r"^```python\s*\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site built as README says, in strict mode: -W (warnings are errors) -n (every
    cross-reference must resolve)."""
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "-n", "--keep-going", "-q", "-b", "html"]
        + ["-d", str(out / "doctrees"), str(DOCS), str(out / "html")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"the site does not build cleanly:\n{result.stderr[-5000:]}"
    return out / "html"


def test_every_public_name_has_a_rendered_api_entry(site):
    html = (site / "api.html").read_text()
    missing = [name for name in swats_jax.__all__ if f'id="swats_jax.{name}"' not in html]
    assert not missing, f"no API entry for {missing}"
    for name in ("train.trainer.train_and_evaluate", "train.config.Config"):
        assert f'id="{name}"' in (site / "training-api.html").read_text(), name


def test_math_in_docstrings_is_rendered(site):
    html = (site / "api.html").read_text()
    assert r"\Lambda" in html and 'class="math' in html  # MathJax input, not a raw :math: role
    assert ":math:" not in html and ":func:" not in html and ":class:" not in html


def test_the_cli_reference_lists_every_option_of_the_parser(site):
    html = (site / "cli.html").read_text()
    options = [a.option_strings[-1] for a in cifar._parser()._actions if a.dest != "help"]
    assert len(options) > 20
    code = '<code class="docutils literal notranslate"><span class="pre">'
    missing = [option for option in options if f"{code}{option}" not in html]
    assert not missing, f"options missing from the CLI reference: {missing}"


def _pages_with_code():
    pages = [ROOT / "README.md", *DOCS.glob("*.md")]
    return sorted(p for p in pages if "```python" in p.read_text())


def _blocks(page: Path) -> list[str]:
    text = page.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        if not NOT_RUN.search(before):
            blocks.append(match.group(1))
    return blocks


def test_the_pages_with_code_are_found():
    names = {p.name for p in _pages_with_code()}
    assert {"README.md", "getting-started.md", "guide.md", "faq.md"} <= names


@pytest.mark.parametrize("page", _pages_with_code(), ids=lambda p: p.name)
def test_the_code_of_a_page_runs(page, tmp_path, monkeypatch, capsys):
    """Each page's Python blocks run in order in one namespace, as a reader pasting them
    would (assertions in them check what the text says), under JAX's default rank promotion
    (the other tests raise on it)."""
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"docs.{page.stem}"}
    blocks = _blocks(page)
    assert blocks, f"{page.name}: every block is marked not run"
    with jax.numpy_rank_promotion("allow"):
        for number, block in enumerate(blocks, 1):
            try:
                exec(compile(block, f"{page.name}, block {number}", "exec"), namespace)
            except Exception as err:
                message = f"{page.name}, Python block {number} fails: {err!r}"
                raise AssertionError(message) from err


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines"
