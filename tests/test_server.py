"""The OpenAI-compatible server against the official openai client and raw HTTP.

Every server here is real: uvicorn on a loopback port, the engine on its own thread.
Outputs are compared with the offline LLM on the same weights, token for token.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from strata import LLM, SamplingParams
from tests.server_utils import RunningServer, engine_factory, start_server

MODEL = "tiny"
LLM_KWARGS = {"kv_cache_memory": 0.05, "max_model_len": 1024}


@pytest.fixture(scope="module")
def offline(tiny_chat_folder: Path) -> LLM:
    return LLM(str(tiny_chat_folder), device="cpu", **LLM_KWARGS)


@pytest.fixture(scope="module")
def server(tiny_chat_folder: Path) -> Iterator[RunningServer]:
    running = start_server(engine_factory(str(tiny_chat_folder), **LLM_KWARGS), model_name=MODEL)
    yield running
    running.stop()


@pytest.fixture
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def greedy(offline: LLM, prompt: str | list[int], max_tokens: int, **kw: object) -> str:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)  # type: ignore[arg-type]
    return offline.generate(prompt, params)[0].text


# ---- outputs --------------------------------------------------------------------------------


def test_completion_greedy_equals_offline(client: openai.OpenAI, offline: LLM) -> None:
    prompt = "The quick brown fox"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == greedy(offline, prompt, 12)
    assert r.object == "text_completion" and r.model == MODEL
    n_prompt = len(offline.get_tokenizer()(prompt).input_ids)
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == n_prompt + 12
    assert r.choices[0].finish_reason == "length"


def test_completion_prompt_list_and_token_ids(client: openai.OpenAI, offline: LLM) -> None:
    prompts = ["one two three", "alpha beta"]
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [greedy(offline, p, 5) for p in prompts]
    ids = [5, 900, 1200, 77]
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0)
    assert r.choices[0].text == greedy(offline, ids, 4)
    assert r.usage.prompt_tokens == 4


def test_chat_greedy_equals_offline(client: openai.OpenAI, offline: LLM) -> None:
    messages = [{"role": "user", "content": "Hello there"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)  # type: ignore[arg-type]
    expected = offline.chat(messages, SamplingParams(max_tokens=10, temperature=0.0))[0]
    assert r.choices[0].message.content == expected.text
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(expected.prompt_token_ids)
    r2 = client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=3, temperature=0
    )  # type: ignore[arg-type]
    assert r2.usage.completion_tokens == 3


def test_penalties_and_biases_equal_offline(client: openai.OpenAI, offline: LLM) -> None:
    prompt = "one one one two"
    r = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=10, temperature=0, frequency_penalty=1.5,
        presence_penalty=0.5, logit_bias={"1000": 4.0},
        extra_body={"repetition_penalty": 1.4, "min_tokens": 10, "bad_words": ["two"]},
    )  # fmt: skip
    expected = greedy(
        offline, prompt, 10, frequency_penalty=1.5, presence_penalty=0.5,
        logit_bias={1000: 4.0}, repetition_penalty=1.4, min_tokens=10, bad_words=("two",),
    )  # fmt: skip
    assert r.choices[0].text == expected
    assert expected != greedy(offline, prompt, 10)
    forced = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0,
        logit_bias={"1000": 100},
    )  # type: ignore[arg-type]  # fmt: skip
    assert forced.choices[0].message.content == offline.get_tokenizer().decode([1000] * 3)


def test_echo_with_logprobs_scores_the_prompt(client: openai.OpenAI, offline: LLM) -> None:
    prompt = "The cat sat on the mat"
    ids = offline.get_tokenizer()(prompt).input_ids
    params = SamplingParams(max_tokens=3, temperature=0, logprobs=2, prompt_logprobs=2)
    expected = offline.generate(prompt, params)[0]
    assert expected.prompt_logprobs is not None and expected.logprobs is not None
    r = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=2
    )
    choice = r.choices[0]
    assert choice.text == prompt + expected.text
    lp = choice.logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert len(lp.token_logprobs) == len(ids) + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    entries = [*expected.prompt_logprobs, *expected.logprobs]
    assert lp.token_logprobs[1:] == [e.logprob for e in entries]
    assert [len(t) for t in lp.top_logprobs[1:]] == [2] * len(entries)
    assert lp.text_offset is not None and lp.text_offset[0] == 0
    # max_tokens 0 scores the prompt only, as lm-evaluation-harness asks.
    scored = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=0
    )
    assert scored.choices[0].text == prompt and scored.usage.completion_tokens == 0
    assert scored.choices[0].finish_reason == "length"
    score = scored.choices[0].logprobs
    assert score is not None and score.token_logprobs is not None
    assert score.token_logprobs[1:] == [e.logprob for e in expected.prompt_logprobs]
    assert score.top_logprobs is None
    stream = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=2,
        stream=True,
    )  # fmt: skip
    chunks = [c.choices[0] for c in stream if c.choices]
    assert "".join(c.text for c in chunks) == choice.text
    streamed = [x for c in chunks if c.logprobs for x in c.logprobs.token_logprobs or []]
    assert streamed == lp.token_logprobs


def test_chat_stream_concatenates_to_the_same_text(client: openai.OpenAI) -> None:
    kw = {"model": MODEL, "messages": [{"role": "user", "content": "Count"}], "max_tokens": 15}
    full = client.chat.completions.create(temperature=0, **kw)  # type: ignore[arg-type]
    stream = client.chat.completions.create(
        temperature=0, stream=True, stream_options={"include_usage": True}, **kw
    )  # type: ignore[arg-type]
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 15
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_stream_raw_sse_ends_with_done(server: RunningServer) -> None:
    body = {"model": MODEL, "prompt": "a b c", "max_tokens": 6, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all(p["object"] == "text_completion" for p in payloads)
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"


def test_async_client_concurrent_requests_match_offline(
    server: RunningServer, offline: LLM
) -> None:
    prompts = [f"story number {i} begins" for i in range(8)]

    async def main() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        async with client:

            async def one(p: str, stream: bool) -> str:
                if not stream:
                    r = await client.completions.create(
                        model=MODEL, prompt=p, max_tokens=8, temperature=0
                    )
                    return r.choices[0].text
                s = await client.completions.create(
                    model=MODEL, prompt=p, max_tokens=8, temperature=0, stream=True
                )
                return "".join([c.choices[0].text async for c in s])

            return await asyncio.gather(*(one(p, i % 2 == 0) for i, p in enumerate(prompts)))

    texts = asyncio.run(main())
    assert texts == [greedy(offline, p, 8) for p in prompts]
    server.assert_no_leaks()


def test_cached_tokens_reported_from_prefix_cache(client: openai.OpenAI) -> None:
    prompt = list(range(1000, 1040))  # 40 tokens: two full 16-token blocks
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    second = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == 32


def test_seeded_sampling_is_reproducible_and_n_choices_differ(client: openai.OpenAI) -> None:
    kw = {"model": MODEL, "prompt": "x", "max_tokens": 8, "temperature": 1.0, "seed": 11}
    a = client.completions.create(n=3, **kw)  # type: ignore[arg-type]
    b = client.completions.create(n=3, **kw)  # type: ignore[arg-type]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert len({c.text for c in a.choices}) > 1
    assert a.usage.prompt_tokens == 1 and a.usage.completion_tokens == 24


def test_logprobs_match_offline(client: openai.OpenAI, offline: LLM) -> None:
    prompt = "logprobs please"
    out = offline.generate(prompt, SamplingParams(max_tokens=4, temperature=0.0, logprobs=3))[0]
    assert out.logprobs is not None
    r = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=4, temperature=0, logprobs=3
    )
    lp = r.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([e.logprob for e in out.logprobs], abs=1e-5)
    assert all(len(top) <= 3 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0
    messages = [{"role": "user", "content": prompt}]
    chat = offline.chat(messages, SamplingParams(max_tokens=3, temperature=0.0, logprobs=2))[0]
    assert chat.logprobs is not None
    rc = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2
    )  # type: ignore[arg-type]
    content = rc.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx(
        [e.logprob for e in chat.logprobs], abs=1e-5
    )
    assert [len(c.top_logprobs) for c in content] == [2, 2, 2]


def test_stop_string_ends_the_text(client: openai.OpenAI, offline: LLM) -> None:
    prompt = "stop test"
    free = greedy(offline, prompt, 20)
    stop = free[len(free) // 2 : len(free) // 2 + 2]
    assert stop.strip(), free
    r = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stop=[stop]
    )
    assert r.choices[0].text == free[: free.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_models_and_health(server: RunningServer, client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_metrics_count_requests_and_tokens(server: RunningServer, client: openai.OpenAI) -> None:
    client.completions.create(model=MODEL, prompt="metrics", max_tokens=3, temperature=0)
    server.wait_idle()
    text = httpx.get(f"{server.url}/metrics").text
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    stats = server.stats()
    assert values["strata_generation_tokens_total"] == stats["num_generated_tokens"]
    assert values["strata_prompt_tokens_total"] == stats["num_prompt_tokens"]
    assert values["strata_prefix_cache_queries_total"] == stats["prefix_cache_queried_tokens"]
    assert values["strata_prefix_cache_hits_total"] == stats["prefix_cache_hit_tokens"]
    assert values["strata_kv_blocks_free"] == stats["kv_blocks_free"]
    assert values["strata_num_requests_running"] == 0
    assert values["strata_num_requests_waiting"] == 0
    assert values["strata_num_preemptions_total"] == stats["num_preemptions"]
    finished = sum(v for k, v in values.items() if k.startswith("strata_request_finished_total"))
    assert values["strata_e2e_request_latency_seconds_count"] == finished >= 1
    assert values["strata_time_to_first_token_seconds_count"] >= 1
    assert "strata_time_per_output_token_seconds_count" in values


def test_each_request_is_logged_once(
    client: openai.OpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="strata.server"):
        r = client.completions.create(model=MODEL, prompt=[3, 4, 5], max_tokens=2, temperature=0)
    lines = [rec.getMessage() for rec in caplog.records if r.id in rec.getMessage()]
    assert len(lines) == 1
    assert "prompt 3 tokens (0 cached), completion 2 tokens" in lines[0]
    assert "ttft" in lines[0] and "e2e" in lines[0]


def test_return_token_ids_serves_a_model_without_tokenizer(tiny_models: dict) -> None:
    folder, _ = tiny_models["llama-gqa"]
    offline = LLM(str(folder), device="cpu", kv_cache_memory=0.01)
    expected = offline.generate([3, 4, 5], SamplingParams(max_tokens=6, temperature=0.0))[0]
    running = start_server(engine_factory(str(folder), kv_cache_memory=0.01), model_name="no-tok")
    try:
        body = {"model": "no-tok", "prompt": [3, 4, 5], "max_tokens": 6, "temperature": 0,
                "return_token_ids": True}  # fmt: skip
        r = httpx.post(f"{running.url}/v1/completions", json=body, timeout=30).json()
        assert r["choices"][0]["token_ids"] == expected.token_ids
        assert r["choices"][0]["text"] == ""
        with httpx.stream(
            "POST", f"{running.url}/v1/completions", json={**body, "stream": True}, timeout=30
        ) as s:
            events = [line for line in s.iter_lines() if line.startswith("data: {")]
        streamed = [t for e in events for t in json.loads(e[6:])["choices"][0]["token_ids"]]
        assert streamed == expected.token_ids
        chat = {"model": "no-tok", "messages": [{"role": "user", "content": "x"}]}
        r = httpx.post(f"{running.url}/v1/chat/completions", json=chat, timeout=30)
        assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]
    finally:
        running.stop()


def test_loglikelihood_requests_as_lm_eval_sends_them(server: RunningServer, offline: LLM) -> None:
    """lm-evaluation-harness's local-completions: token-id prompts, echo, max_tokens 0."""
    prompts = [[5, 900, 1200, 77, 31], [400, 401, 402]]
    body = {"model": MODEL, "prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 1,
            "temperature": 0, "seed": 1234}  # fmt: skip
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    for prompt, choice in zip(prompts, choices, strict=True):
        ref = offline.generate(prompt, SamplingParams(max_tokens=0, prompt_logprobs=1))[0]
        assert ref.prompt_logprobs is not None
        lp = choice["logprobs"]
        assert lp["token_logprobs"] == [None] + [e.logprob for e in ref.prompt_logprobs]
        assert len(lp["tokens"]) == len(prompt) and lp["top_logprobs"][0] is None
        assert [len(t) for t in lp["top_logprobs"][1:]] == [1] * (len(prompt) - 1)
        assert choice["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 0
