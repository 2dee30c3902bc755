"""Sphinx configuration of the tt-conv documentation.

Build (from the repository root)::

    python -m sphinx -W -b html docs docs/_build/html

The tutorials in ``docs/tutorials/`` are executed by sphinx-gallery on the CPU during the
build. Cross-links to Python, PyTorch, NumPy and TensorLy are added only for the
inventories that can be reached when the build starts, so an offline build passes under
``-W``; set ``TT_CONV_DOCS_OFFLINE=1`` to skip the reachability check altogether.
"""

from __future__ import annotations

import concurrent.futures
import os
import sys
import urllib.request
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS / "_ext"))
# The tutorials import tt_conv and applications from the checkout, not an installed copy.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])

# Tutorials run on the CPU whatever the machine has.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import torch  # noqa: E402

import tt_conv  # noqa: E402

# One PyTorch thread for the tutorials: on a shared machine, more threads than free cores
# make OpenMP spin and run an order of magnitude slower. TT_CONV_DOCS_THREADS overrides it.
torch.set_num_threads(int(os.environ.get("TT_CONV_DOCS_THREADS", "1")))

# -- Project -----------------------------------------------------------------------------

project = "tt-conv"
author = "tt-conv developers"
copyright = "2026, tt-conv developers"
release = tt_conv.__version__
version = ".".join(release.split(".")[:2])

# -- General -----------------------------------------------------------------------------

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
    "cli_help",  # docs/_ext/cli_help.py: --help text of the commands, from the code
]

templates_path = ["_templates"]
exclude_patterns = [
    "_build",
    "tutorials",  # sphinx-gallery sources; their pages are in auto_tutorials/
    "results/*.rst",  # included into the results page, not pages of their own
    "auto_tutorials/*.ipynb",
    "auto_tutorials/*.py",
    "auto_tutorials/*.zip",
    "auto_tutorials/*.md5",
]
default_role = "py:obj"
nitpicky = False

# -- autodoc / autosummary / numpydoc ----------------------------------------------------

autosummary_generate = True
autosummary_imported_members = False
autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "none"  # numpydoc's "Parameters" sections say the types
autodoc_mock_imports: list = []

numpydoc_show_class_members = False  # members are listed by the autosummary templates
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

# -- intersphinx: only the inventories that answer ---------------------------------------

_INVENTORIES = {
    "python": "https://docs.python.org/3",
    "torch": "https://docs.pytorch.org/docs/stable",
    "numpy": "https://numpy.org/doc/stable",
    "tensorly": "https://tensorly.org/stable",
}


def _reachable(url: str, timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/objects.inv", timeout=timeout) as response:
            return response.status == 200
    except Exception:  # offline, DNS failure, timeout, HTTP error: no cross-links
        return False


def _intersphinx_mapping() -> dict:
    if os.environ.get("TT_CONV_DOCS_OFFLINE"):
        return {}
    with concurrent.futures.ThreadPoolExecutor(len(_INVENTORIES)) as pool:
        alive = dict(zip(_INVENTORIES, pool.map(_reachable, _INVENTORIES.values())))
    return {name: (url, None) for name, url in _INVENTORIES.items() if alive[name]}


intersphinx_mapping = _intersphinx_mapping()
intersphinx_timeout = 5

# -- sphinx-gallery ----------------------------------------------------------------------

sphinx_gallery_conf = {
    "examples_dirs": ["tutorials"],
    "gallery_dirs": ["auto_tutorials"],
    "filename_pattern": r"/plot_",
    "within_subsection_order": "FileNameSortKey",
    "download_all_examples": False,
    "remove_config_comments": True,
    "matplotlib_animations": False,
    "image_scrapers": ("matplotlib",),
    "abort_on_example_error": True,
    "only_warn_on_example_error": False,
    "show_memory": False,
    "reset_modules": ("matplotlib",),
    "capture_repr": ("_repr_html_", "__repr__"),
    "min_reported_time": 1,
}

# -- HTML --------------------------------------------------------------------------------

html_theme = "furo"
html_title = f"tt-conv {release}"
html_static_path: list = []
html_theme_options = {
    "navigation_with_keys": True,
}


def _check_api_coverage(app):
    """Warn (an error under -W) for a public ``tt_conv`` name the API page does not list."""
    listed = (DOCS / "api" / "tt_conv.rst").read_text(encoding="utf-8")
    missing = [name for name in tt_conv.__all__
               if f"   {name}\n" not in listed and f"modules/tt_conv.{name}\n" not in listed]
    if missing:
        from sphinx.util import logging

        logging.getLogger(__name__).warning(
            "docs/api/tt_conv.rst does not list these names of tt_conv.__all__: %s",
            ", ".join(missing))


def setup(app):
    app.connect("builder-inited", _check_api_coverage)
