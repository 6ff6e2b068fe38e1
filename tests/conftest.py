"""The (backend, device, dtype) fixture and the Hypothesis profile.

Every combination refattn knows is a parameter, so the test ids say what ran
(``numpy-cpu-float16``, ``torch-cuda:0-bfloat16``); a backend that is missing
here, or narrowed away by ``REFATTN_BACKENDS``, shows up as one skipped id.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from refattn.backends import BACKENDS, Case, selected

settings.register_profile(
    "refattn",
    # 150 examples per property keeps `make test` near 20 minutes on two cores; a thorough
    # run sets more (REFATTN_EXAMPLES=1000), and the GPU and JAX passes fewer
    max_examples=int(os.environ.get("REFATTN_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    print_blob=True,
)
settings.load_profile("refattn")


def _case_params() -> list[object]:
    chosen = {b.name for b in selected()}
    params: list[object] = []
    for backend in BACKENDS.values():
        if backend.name not in chosen:
            reason = "not in REFATTN_BACKENDS"
        else:
            reason = backend.unavailable_reason() or ""
        if reason:
            params.append(
                pytest.param(None, id=backend.name, marks=pytest.mark.skip(reason=reason))
            )
            continue
        for device in backend.devices():
            for dtype in backend.dtypes(device):
                case = Case(backend, device, dtype)
                params.append(pytest.param(case, id=case.id))
    return params


@pytest.fixture(params=_case_params())
def case(request: pytest.FixtureRequest) -> Case:
    """One (backend, device, dtype) the spec runs in."""
    case: Case = request.param
    return case
