"""Process-wide CPU settings of the service (`perf.py`): OpenMP's wait policy for the server but not for its model
processes, and one BLAS thread for the searches."""

import os

import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from momentum_proxy import perf


@pytest.fixture
def fresh_policy(monkeypatch):
    """No OMP_WAIT_POLICY set by anyone yet (restored afterwards)."""
    monkeypatch.setenv("OMP_WAIT_POLICY", "")  # so that the original (or its absence) comes back afterwards
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setattr(perf, "_PASSIVE_SET", False)


def test_serve_sets_a_passive_wait_that_model_processes_do_not_inherit(fresh_policy):
    perf.passive_omp_wait()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    env = perf.child_env({**os.environ, "OTHER": "kept"})
    assert "OMP_WAIT_POLICY" not in env and env["OTHER"] == "kept" and env["PATH"] == os.environ["PATH"]
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"  # the server's own stays


@pytest.mark.parametrize("policy", ["ACTIVE", "PASSIVE"])
def test_a_policy_the_user_set_is_kept_for_the_server_and_its_model_processes(fresh_policy, monkeypatch, policy):
    monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    perf.passive_omp_wait()
    assert os.environ["OMP_WAIT_POLICY"] == policy
    assert perf.child_env(dict(os.environ))["OMP_WAIT_POLICY"] == policy


def test_single_thread_blas_limits_every_blas_library_to_one_thread():
    import numpy  # noqa: F401  (loads the BLAS that threadpoolctl finds)

    assert [i for i in threadpool_info() if i["user_api"] == "blas"], "numpy's BLAS is found (threadpoolctl)"
    with threadpool_limits(limits=None):  # restores the limits on exit
        threadpool_limits(2, user_api="blas")
        assert {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"} == {2}
        perf.single_thread_blas()
        assert {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"} == {1}
