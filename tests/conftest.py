"""Test-session settings and fixtures shared by the test modules.

The recurrent cells compile their pointwise kernels by default (``pointwise="auto"``), which
costs seconds per kernel signature; the suite builds cells of dozens of configurations, so
it runs them eager unless ``TT_CONV_POINTWISE`` is set. The compiled kernels are tested
explicitly (``pointwise="compiled"``) in tests/test_pointwise.py against the same float64
transcriptions of the maths.
"""

import os

import pytest
import torch

os.environ.setdefault("TT_CONV_POINTWISE", "eager")


def threads_fixture(count: int):
    """A module-scoped autouse fixture running the module's tests on ``count`` threads
    (small linear algebra is far slower with 2 threads on a shared 2-core machine)."""

    @pytest.fixture(autouse=True, scope="module")
    def fixture():
        threads = torch.get_num_threads()
        torch.set_num_threads(count)
        yield
        torch.set_num_threads(threads)

    return fixture
