"""The test suite's own guards."""

import pytest

from tests.helpers import uses_the_gpu


def test_a_cuda_test_that_allocated_nothing_on_the_gpu_fails():
    counts = iter([7, 7])
    with (
        pytest.raises(
            pytest.fail.Exception, match=r"t\[cuda\] allocated nothing on the GPU"
        ),
        uses_the_gpu("t[cuda]", allocations=lambda: next(counts)),
    ):
        pass
    counts = iter([7, 9])
    with uses_the_gpu("t[cuda]", allocations=lambda: next(counts)):
        pass  # two allocations on the GPU: it ran there


def test_cuda_parameters_of_the_suite_are_guarded(pytestconfig: pytest.Config):
    # The guard is an autouse fixture of the whole suite.
    manager = pytestconfig.pluginmanager
    conftests = [
        p
        for p in manager.get_plugins()
        if getattr(p, "__name__", "").endswith("conftest")
    ]
    assert any(hasattr(p, "cuda_tests_run_on_the_gpu") for p in conftests)
