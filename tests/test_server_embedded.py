"""The real embedded model behind the server, driven by the official openai client."""

from __future__ import annotations

import openai

from tests.server_utils import engine_factory, start_server


def test_embedded_model_answers_over_http() -> None:
    running = start_server(
        engine_factory(None, kv_cache_memory=0.2, max_model_len=1024), model_name="smollm2-135m"
    )
    try:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="x", max_retries=0)
        question = [{"role": "user", "content": "What is the capital of France?"}]
        r = client.chat.completions.create(
            model="smollm2-135m", messages=question, max_tokens=20, temperature=0
        )  # type: ignore[arg-type]
        assert r.choices[0].message.content == "The capital of France is Paris."
        assert r.choices[0].finish_reason == "stop"
        again = client.chat.completions.create(
            model="smollm2-135m",
            messages=question,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )  # type: ignore[arg-type]
        chunks = list(again)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "The capital of France is Paris."
        usage = chunks[-1].usage
        assert usage.prompt_tokens == r.usage.prompt_tokens
        # the second turn reads the prompt's full blocks from the prefix cache
        assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens // 16 * 16
        running.wait_idle()
        running.engine.check_integrity()
    finally:
        running.stop()
