"""A full queue answers 503 with Retry-After; SIGTERM ends streams in flight and the process cleanly."""

from __future__ import annotations

import time

import openai
import pytest

from live_server import LiveServer


def test_queue_full_then_sigterm(smollm2_gguf):
    live = LiveServer(["smollm2", "-t", "2", "-c", "4096", "--max-sequences", "1", "--max-queue", "1"])
    try:
        client = live.client(api_key="none")
        ask = dict(model="smollm2", messages=[{"role": "user", "content": "Tell me a long story."}],
                   max_tokens=3000, temperature=1.0, frequency_penalty=-2, stream=True)
        first = client.chat.completions.create(**ask)
        next(iter(first))  # running
        second = client.chat.completions.create(**ask)  # waits in the queue
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(**ask)
        assert e.value.status_code == 503
        assert e.value.response.headers["retry-after"] == "1"
        assert e.value.response.json()["error"]["code"] == "queue_full"
        second.close()
        t0 = time.monotonic()
        status = live.stop()
        with pytest.raises(openai.APIError, match="shutting down"):
            for _ in first:
                pass
        assert status == 0, live.log()
        assert time.monotonic() - t0 < 10
        assert "pocketlm: stopped" in live.log()
    finally:
        if live.proc.poll() is None:
            live.proc.kill()
