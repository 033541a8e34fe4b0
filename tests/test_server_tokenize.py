"""POST /tokenize and /detokenize: prompts and conversations, as vLLM names them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from strata import LLM
from tests.server_utils import ENGINES, RunningServer, start_server

MODEL = "tiny"
LLM_KWARGS = {"kv_cache_memory": 0.02, "max_model_len": 512}


@pytest.fixture(scope="module", params=["thread", "process"])
def server(request: pytest.FixtureRequest, tiny_chat_folder: Path) -> Iterator[RunningServer]:
    running = start_server(
        ENGINES[request.param](str(tiny_chat_folder), **LLM_KWARGS), model_name=MODEL
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def offline(tiny_chat_folder: Path) -> LLM:
    return LLM(str(tiny_chat_folder), device="cpu", **LLM_KWARGS)


def post(server: RunningServer, path: str, body: object) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=30)


def test_tokenize_prompt_and_back(server: RunningServer, offline: LLM) -> None:
    tok = offline.get_tokenizer()
    r = post(
        server, "/tokenize", {"model": MODEL, "prompt": "Hello world", "return_token_strs": True}
    )
    assert r.status_code == 200, r.text
    ids = tok("Hello world").input_ids
    assert r.json() == {
        "count": len(ids),
        "max_model_len": 512,
        "tokens": ids,
        "token_strs": tok.convert_ids_to_tokens(ids),
    }
    back = post(server, "/detokenize", {"model": MODEL, "tokens": ids})
    assert back.status_code == 200 and back.json() == {"prompt": "Hello world"}


def test_tokenize_messages_as_the_chat_route_renders_them(
    server: RunningServer, offline: LLM
) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = post(server, "/tokenize", {"messages": messages})
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == offline.chat_prompt_ids(messages)
    assert r.json()["token_strs"] is None
    bare = post(server, "/tokenize", {"messages": messages, "add_generation_prompt": False})
    tok = offline.get_tokenizer()
    text = tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert bare.json()["tokens"] == tok(text, add_special_tokens=False).input_ids
    assert bare.json()["count"] < r.json()["count"]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "prompt"),
        ("/tokenize", {"messages": []}, "messages"),
        ("/detokenize", {"tokens": [49152]}, "tokens"),
        ("/detokenize", {"tokens": [-1]}, "tokens"),
        ("/detokenize", {"tokens": "abc"}, "tokens"),
    ],
)
def test_bad_bodies_are_400(
    server: RunningServer, path: str, body: dict[str, object], param: str
) -> None:
    r = post(server, path, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_unknown_model_is_404(server: RunningServer) -> None:
    r = post(server, "/tokenize", {"model": "other", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
