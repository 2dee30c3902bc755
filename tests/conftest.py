"""Fixtures shared by the test modules."""

import pytest
import torch


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
