"""TTFT of turn 6 of a chat (history resent each turn, ~1,500 tokens) with a stateful session vs without.

Starts the real server (gunicorn, sessions on, the embedded model unless BENCH_SESSION_MODEL names a folder),
then plays the same 6-turn conversation twice, once inside a SageMaker session and once without, while other
clients send unrelated long prompts that compete for the prefix cache. Reports each turn's time to first token.
With the engine's prefix cache, the session's blocks stay pinned, so its turn 6 prefills only the new message.

Run: .venv/bin/python scripts/bench/sessions.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.helpers import start_server  # noqa: E402

TURNS = 6
WORDS_PER_TURN = int(os.environ.get("BENCH_SESSION_WORDS", "40"))  # ~250 tokens a message: ~1,500 by turn 6
NOISE_CLIENTS = int(os.environ.get("BENCH_SESSION_NOISE", "4"))
THINK_S = float(os.environ.get("BENCH_SESSION_THINK", "5"))  # the user reading and typing: others churn the cache
TOPICS = ["rivers", "mountains", "harbours", "forests", "deserts", "glaciers", "islands", "canyons"]


def message(topic: str, turn: int) -> str:
    """A long user message, different for every topic and turn."""
    return f"Turn {turn}. Tell me about {topic}. " + " ".join(f"{topic}-{turn}-{i}" for i in range(WORDS_PER_TURN))


def first_token_seconds(url: str, messages: list[dict], headers: dict) -> tuple[float, str]:
    """Stream a chat answer; the seconds to its first content chunk, and the full answer."""
    body = {"messages": messages, "max_tokens": 12, "temperature": 0, "stream": True}
    started, first, text = time.monotonic(), None, []
    with requests.post(url + "/invocations", json=body, headers=headers, stream=True, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines(decode_unicode=True):
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line[len("data: ") :]).get("choices") or [{}]
            content = choices[0].get("delta", {}).get("content")
            if content:  # the opening chunk carries the role and an empty content: not a token yet
                first = first or time.monotonic() - started
                text.append(content)
    return first or float("nan"), "".join(text)


def conversation(url: str, topic: str, session: bool) -> list[float]:
    """Play TURNS turns, resending the history; TTFT of each turn."""
    headers: dict = {}
    if session:
        created = requests.post(url + "/invocations", json={"requestType": "NEW_SESSION"}, timeout=60)
        headers["X-Amzn-SageMaker-Session-Id"] = created.headers["X-Amzn-SageMaker-New-Session-Id"].split(";")[0]
    history: list[dict] = []
    ttfts = []
    for turn in range(1, TURNS + 1):
        history.append({"role": "user", "content": message(topic, turn)})
        ttft, _ = first_token_seconds(url, history, headers)
        ttfts.append(ttft)
        history.append({"role": "assistant", "content": f"Noted, part {turn} about {topic}."})
        time.sleep(THINK_S)
    if session:
        requests.post(url + "/invocations", json={"requestType": "CLOSE"}, headers=headers, timeout=60)
    return ttfts


def noise(url: str, stop: threading.Event, index: int) -> None:
    """Unrelated long prompts, one after another, until stopped."""
    turn = 0
    while not stop.is_set():
        turn += 1
        first_token_seconds(url, [{"role": "user", "content": message(TOPICS[2 + index % 6], turn)}], {})


def main() -> None:
    env = {
        "SAGEMAKER_ENABLE_STATEFUL_SESSIONS": "true",
        "MESSAGES_API_ENABLED": "true",
        # a pool small enough that the unrelated traffic evicts what nothing pins
        "MAX_BATCH_TOTAL_TOKENS": os.environ.get("BENCH_SESSION_KV_TOKENS", "4096"),
    }
    if os.environ.get("BENCH_SESSION_MODEL"):
        env["HF_MODEL_ID"] = os.environ["BENCH_SESSION_MODEL"]
    server = start_server(env, Path(tempfile.mkdtemp(prefix="bench-sessions-")), timeout=600)
    stop = threading.Event()
    noisy = [threading.Thread(target=noise, args=(server.url, stop, i), daemon=True) for i in range(NOISE_CLIENTS)]
    try:
        for thread in noisy:
            thread.start()
        without = conversation(server.url, TOPICS[0], session=False)
        with_session = conversation(server.url, TOPICS[1], session=True)
    finally:
        stop.set()
        server.stop()
    print("| turn | TTFT without session (s) | TTFT with session (s) |\n| ---: | ---: | ---: |")
    for turn, (plain, kept) in enumerate(zip(without, with_session), start=1):
        print(f"| {turn} | {plain:.2f} | {kept:.2f} |")


if __name__ == "__main__":
    main()
