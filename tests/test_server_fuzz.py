"""Fuzz the server's OpenAPI schema with schemathesis: no input may produce a 5xx.

Bounded: a tiny model with a 128-token context, 25 examples per route and generation
mode (valid and invalid requests), derandomized so a failure reproduces. The cases come
from schemathesis's documented Hypothesis strategies (`APIOperation.as_strategy`) under
plain `@given`, not from its pytest plugin, whose lazy fixture support reaches into
pytest internals that pytest 9.2 removed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402

from tests.server_utils import RunningServer, engine_factory, start_server  # noqa: E402

EXAMPLES_PER_ROUTE = 25


@pytest.fixture(scope="module")
def fuzz_server(tiny_chat_folder: Path) -> Iterator[RunningServer]:
    make = engine_factory(str(tiny_chat_folder), kv_cache_memory=0.02, max_model_len=128)
    running = start_server(make, model_name="tiny", max_waiting_requests=64)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def operations(fuzz_server: RunningServer) -> list[Any]:
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    found = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in found}
    assert {"POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models"} <= labels
    return found


def has_inputs(operation: Any) -> bool:
    """Whether the route takes anything an invalid request could get wrong."""
    return bool(len(operation.body) or any(True for _ in operation.iter_parameters()))


def check_response(case: Any) -> None:
    response = case.call(timeout=60)
    where = f"{case.operation.label} {case.body!r}"
    assert response.status_code < 500, (where, response.status_code, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["message"] and set(error) == {"message", "type", "param", "code"}, where


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode))
def test_no_input_gives_a_server_error(mode: Any, operations: list[Any]) -> None:
    for operation in operations:
        if mode is schemathesis.GenerationMode.NEGATIVE and not has_inputs(operation):
            continue  # GET /health and the like: every request is a valid one

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES_PER_ROUTE,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def fuzz(case: Any) -> None:
            check_response(case)

        fuzz()


def test_no_blocks_leak_after_fuzzing(fuzz_server: RunningServer) -> None:
    fuzz_server.assert_no_leaks()
