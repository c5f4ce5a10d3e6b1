"""Test helpers: tiny random models, an in-process engine, and the real entrypoint as a subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
import requests

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = ROOT / "container" / "entrypoint.sh"


TINY_KV_TOKENS = 16384  # the tiny model's KV pool in in-process engines: its context is 512 tokens


def build_tiny_llama(target: Path, tokenizer_source: Path, layers: int = 2, hidden: int = 64, seed: int = 0) -> Path:
    """A random Llama with the embedded model's tokenizer and chat template, small enough for fast tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_source))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return target


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    """The real container entrypoint running gunicorn in a subprocess."""

    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


def server_env(extra: dict[str, str], port: int) -> dict[str, str]:
    """The test process's environment with the venv on PATH and SageMaker-style variables set."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_MODEL_ID", "MESSAGES_API_ENABLED")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["SAGEMAKER_BIND_TO_PORT"] = str(port)
    env.setdefault("SM_MODEL_DIR", "/nonexistent-sagemaker-model-dir")
    # a KV pool the size tests need, not 20% of free RAM zeroed per server (several servers live at once)
    env.setdefault("MAX_BATCH_TOTAL_TOKENS", str(TINY_KV_TOKENS))
    env.setdefault("DTYPE", "float32")  # "auto" is bf16 on AMX hosts: the same tokens and layout on every host
    env.update(extra)
    return env


def start_server(extra_env: dict[str, str], log_dir: Path, wait: bool = True, timeout: float = 180.0) -> Server:
    """Run ``container/entrypoint.sh serve``; with ``wait``, return once /ping answers 200."""
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [str(ENTRYPOINT), "serve"],
            env=server_env(extra_env, port),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    server = Server(process, port, log_path)
    if wait:
        wait_healthy(server, timeout)
    return server


def _die_with_parent() -> None:
    """In the server's process before exec: SIGTERM it when the test process dies (a pytest killed by its timeout
    or by hand skips every fixture's teardown; its servers must not outlive it)."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def wait_healthy(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log()[-4000:]}")
        try:
            if requests.get(server.url + "/ping", timeout=2).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"server not healthy after {timeout} s:\n{server.log()[-4000:]}")


def streamed_chat(max_tokens: int, content: str = "Hi") -> dict:
    """A streamed chat body that runs exactly ``max_tokens`` tokens (``ignore_eos``) and ends with a usage chunk."""
    return {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def sse_data(body: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order."""
    return [line[len("data: ") :] for line in body.splitlines() if line.startswith("data: ")]


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def english_words(text: str) -> int:
    """How many ASCII alphabetic words ``text`` holds (our check that an answer is English prose)."""
    return sum(
        1 for word in text.split() if word.strip(".,;:!?()\"'").isascii() and word.strip(".,;:!?()\"'").isalpha()
    )
