"""The docs build offline and render: formulas typeset, figures drawn, nothing fetched remotely."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PNG = b"\x89PNG\r\n\x1a\n"


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *map(str, args)], capture_output=True, text=True, check=False, cwd=ROOT
    )


def test_offline_check_reports_each_remote_script_stylesheet_font_and_image(
    tmp_path: Path,
) -> None:
    (tmp_path / "page.html").write_text(
        '<html><head><script src="https://cdn.example.org/mathjax.js"></script>'
        '<link rel="stylesheet" href="//fonts.example.org/css">'
        '<style>@import "http://example.org/a.css";</style></head>'
        '<body><img src="https://example.org/plot.png">'
        '<a href="https://example.org/">a link is not fetched</a></body></html>'
    )
    (tmp_path / "theme.css").write_text(
        "@font-face { src: url(https://fonts.gstatic.com/x.woff2) }\n"
        "body { background: url('_static/local.png') }"
    )
    run = _run(DOCS / "check_offline.py", tmp_path)
    assert run.returncode == 1, run.stdout
    for remote in (
        "cdn.example.org/mathjax.js",
        "//fonts.example.org/css",
        "http://example.org/a.css",
        "example.org/plot.png",
        "fonts.gstatic.com/x.woff2",
    ):
        assert remote in run.stdout
    assert "example.org/\n" not in run.stdout and "local.png" not in run.stdout


def test_offline_check_passes_a_page_that_loads_only_local_files(tmp_path: Path) -> None:
    (tmp_path / "page.html").write_text(
        '<html><head><script src="_static/mathjax/tex-chtml.js"></script>'
        '<link rel="stylesheet" href="_static/furo.css"></head>'
        '<body><img src="_images/plot.png"><a href="https://example.org/">link</a></body></html>'
    )
    run = _run(DOCS / "check_offline.py", tmp_path)
    assert run.returncode == 0, run.stdout
    assert "scanned 1 HTML pages" in run.stdout


def test_cache_figures_draw_every_cache_kind_from_the_classes(tmp_path: Path) -> None:
    run = _run(DOCS / "figures" / "cache_figures.py", tmp_path)
    assert run.returncode == 0, run.stderr
    names = {"static", "dynamic", "sliding", "paged", "quantized", "cross"}
    assert {p.stem for p in tmp_path.glob("*.png")} == names
    for path in tmp_path.glob("*.png"):
        assert path.read_bytes().startswith(PNG) and path.stat().st_size > 10_000


def test_every_page_is_in_the_toctree_and_rendered_by_the_render_check() -> None:
    pages = sorted(p.stem for p in DOCS.glob("*.md"))
    assert "backward" in pages and "index" in pages, pages
    spec = importlib.util.spec_from_file_location("check_render", DOCS / "check_render.py")
    assert spec is not None and spec.loader is not None
    check_render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_render)
    assert sorted(check_render.PAGES) == pages
    toctree = (DOCS / "index.md").read_text().split("```{toctree}")[1].split("```")[0]
    listed = [line for line in toctree.splitlines() if line and not line.startswith(":")]
    assert sorted(["index", *listed]) == pages


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
@pytest.mark.skipif(
    importlib.util.find_spec("sphinx") is None, reason="the docs extra is not installed"
)
def test_built_docs_open_offline_and_show_their_formulas_and_plots(tmp_path: Path) -> None:
    html = tmp_path / "html"
    build = _run("-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", DOCS, html)
    assert build.returncode == 0, build.stderr
    offline = _run(DOCS / "check_offline.py", html)
    assert offline.returncode == 0, offline.stdout
    render = _run(DOCS / "check_render.py", html, tmp_path / "screenshots")
    assert render.returncode == 0, render.stdout + render.stderr
    assert "every formula typeset, every image present" in render.stdout
    assert len(list((tmp_path / "screenshots").glob("*.png"))) == len(list(DOCS.glob("*.md")))
