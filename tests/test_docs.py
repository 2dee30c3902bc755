"""The documentation covers the public API and its tutorials exist (no Sphinx build here).

The full build (``python -m sphinx -W -b html docs docs/_build/html``) runs in CI; these
checks catch the commonest way docs fall behind the code in a second.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import tt_conv

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def test_every_public_tt_conv_name_is_in_the_api_reference():
    listed = (DOCS / "api" / "tt_conv.rst").read_text(encoding="utf-8")
    missing = [name for name in tt_conv.__all__
               if f"   {name}\n" not in listed and f"modules/tt_conv.{name}\n" not in listed]
    assert not missing, f"add to docs/api/tt_conv.rst: {missing}"


def test_every_api_module_page_names_an_importable_module():
    import importlib

    pages = sorted((DOCS / "api" / "modules").glob("*.rst"))
    assert pages
    for page in pages:
        importlib.import_module(page.stem)
        assert f".. automodule:: {page.stem}\n" in page.read_text(encoding="utf-8")


@pytest.mark.parametrize("module", [
    "model", "complexity", "metrics", "plots", "evaluation", "inference", "precision",
    "data.moving_mnist", "data.kth", "data.ssv2", "data.video", "config", "prediction",
    "training.loop", "training.distributed", "recognition.model", "recognition.task",
])
def test_application_modules_are_documented(module):
    listed = (DOCS / "api" / "applications.rst").read_text(encoding="utf-8")
    assert f"modules/applications.conv_tt_lstm.{module}\n" in listed


def test_tutorials_parse_and_have_a_title():
    tutorials = sorted((DOCS / "tutorials").glob("plot_*.py"))
    assert len(tutorials) >= 4
    for path in tutorials:
        module = ast.parse(path.read_text(encoding="utf-8"))
        docstring = ast.get_docstring(module)
        assert docstring and "\n===" in docstring, f"{path.name} needs a titled docstring"
