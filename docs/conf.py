"""Sphinx configuration: MyST pages, a numpydoc API reference, math served from the build.

MathJax comes from the ``sphinx-mathjax-offline`` package, which copies a
complete MathJax 3 into ``_static/mathjax`` and points ``mathjax_path`` at
it, so no page fetches a script or a font from the internet when it is
opened. ``check_offline.py`` checks the built HTML for that after every
build. The cache figures are drawn from the cache classes themselves before
the pages are read.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

project = "refattn"
author = "the refattn authors"
copyright = "refattn authors, BSD-3-Clause"
release = version = "0.1.0"

extensions = [
    "myst_parser",
    "numpydoc",
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx-mathjax-offline",  # after sphinx.ext.mathjax: it sets mathjax_path to the local copy
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}  # .rst: what autosummary needs
exclude_patterns = ["_build", "figures/*.py", "*.py"]
root_doc = "index"
nitpicky = False

myst_enable_extensions = ["amsmath", "dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the numpydoc sections say the types and shapes
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
numpydoc_validation_checks: set[str] = set()

html_theme = "furo"
html_title = "refattn"
html_static_path: list[str] = []
html_show_sourcelink = False
pygments_style = "friendly"
pygments_dark_style = "monokai"


def _draw_cache_figures(app: object) -> None:
    """Draw the slot diagrams of every cache kind into ``figures/caches``."""
    script = DOCS / "figures" / "cache_figures.py"
    out = DOCS / "figures" / "caches"
    subprocess.run([sys.executable, str(script), str(out)], check=True, stdout=subprocess.DEVNULL)


def setup(app: object) -> None:
    app.connect("builder-inited", _draw_cache_figures)  # type: ignore[attr-defined]
