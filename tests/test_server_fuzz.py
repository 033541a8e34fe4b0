"""Fuzz the server's OpenAPI schema with schemathesis: no input may produce a 5xx.

Bounded: a tiny model with a 128-token context, 15 examples per route and phase
(about 560 calls, 20 s on 2 cores), derandomized so a failure reproduces. Valid and
invalid bodies are both generated.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

from tests.server_utils import RunningServer, engine_factory, start_server  # noqa: E402


@pytest.fixture(scope="module")
def fuzz_server(tiny_chat_folder: Path) -> Iterator[RunningServer]:
    make = engine_factory(str(tiny_chat_folder), kv_cache_memory=0.02, max_model_len=128)
    running = start_server(make, model_name="tiny", max_waiting_requests=64)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def api_schema(fuzz_server: RunningServer):  # type: ignore[no-untyped-def]
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_no_input_gives_a_server_error(case, fuzz_server: RunningServer) -> None:  # type: ignore[no-untyped-def]
    response = case.call(timeout=60)
    assert response.status_code < 500, (case.body, response.status_code, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["message"] and set(error) == {"message", "type", "param", "code"}


def test_no_blocks_leak_after_fuzzing(fuzz_server: RunningServer) -> None:
    fuzz_server.assert_no_leaks()
