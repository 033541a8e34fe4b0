"""A stream whose consumer lags gets the outputs that queued up as one, deltas joined;
finished and failed outputs end the merge."""

from __future__ import annotations

import asyncio
from typing import Any

from strata.engine.front import RequestStream
from strata.engine.outputs import RequestOutput


class _Engine:
    def __init__(self) -> None:
        self.aborted: list[str] = []

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


def _out(tokens: list[int], **kw: Any) -> RequestOutput:
    text = "".join(f"<{t}>" for t in tokens)
    last = tokens[-1]
    return RequestOutput(
        "r", None, [1, 2], text=text, token_ids=tokens, delta_text=f"<{last}>",
        delta_token_ids=[last], **kw,
    )  # fmt: skip


def _drain(outputs: list[RequestOutput]) -> list[RequestOutput]:
    async def run() -> list[RequestOutput]:
        stream = RequestStream(_Engine(), "r", asyncio.get_running_loop())  # type: ignore[arg-type]
        for out in outputs:
            stream.put(out)
        return [out async for out in stream]

    return asyncio.run(run())


def test_queued_outputs_come_as_one_with_joined_deltas() -> None:
    got = _drain([_out([7]), _out([7, 8]), _out([7, 8, 9], finished=True, finish_reason="stop")])
    assert len(got) == 1
    (out,) = got
    assert out.token_ids == [7, 8, 9] and out.text == "<7><8><9>"
    assert out.delta_token_ids == [7, 8, 9] and out.delta_text == "<7><8><9>"
    assert out.finished and out.finish_reason == "stop"


def test_an_error_comes_alone_after_the_tokens_before_it() -> None:
    failed = _out([7, 8, 9], finished=True, finish_reason="error", error="boom")
    got = _drain([_out([7]), _out([7, 8]), failed])
    assert [(o.delta_token_ids, o.error) for o in got] == [([7, 8], None), ([9], "boom")]
