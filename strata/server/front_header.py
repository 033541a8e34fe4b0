"""FrontHeader: with several HTTP front processes on one port (api_fronts.py), every
response names the front that answered it in `x-strata-front` (its index, 0..N-1)."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-strata-front"


class FrontHeader:
    def __init__(self, app: ASGIApp, front: int) -> None:
        self.app = app
        self.value = str(front).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (HEADER, self.value)]
            await send(message)

        await self.app(scope, receive, send_with_header)
