"""One measured bench level against a stand-in server (stdlib HTTP, no model): the load generator, the /metrics
scrapes around the level, the poller during it, and the figures they make."""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "bench"))

import config  # noqa: E402
import server_metrics  # noqa: E402
from load import Endpoint  # noqa: E402
from systems import measure_level  # noqa: E402
from workloads import Workload  # noqa: E402


class FakeServer(BaseHTTPRequestHandler):
    """Streams two content chunks and usage per chat request (holding it open a little); /metrics counts them."""

    lock = threading.Lock()
    running = peak = queries = hits = 0

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        cls = type(self)
        body = (
            f"serve_batch_current_size {cls.running}\nserve_batch_peak_size {cls.peak}\n"
            f"serve_prefix_cache_queries_total {cls.queries}\nserve_prefix_cache_hits_total {cls.hits}\n"
        ).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        cls = type(self)
        json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with cls.lock:
            cls.running += 1
            cls.peak = max(cls.peak, cls.running)
            cls.queries, cls.hits = cls.queries + 100, cls.hits + 64
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        usage = {"prompt_tokens": 100, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 64}}
        for chunk in ({"choices": [{"delta": {"content": "hi"}}]}, {"choices": [{"delta": {"content": "!"}}]}):
            time.sleep(0.3)
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        with cls.lock:
            cls.running -= 1
        end = {"choices": [{"delta": {}, "finish_reason": "length"}], "usage": usage}
        self.wfile.write(f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n".encode())


def test_a_level_reads_peak_prefix_hits_and_cached_tokens():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = Endpoint(f"http://127.0.0.1:{server.server_port}", "m")
        workload = Workload("capacity", ["a", "b", "c", "d"], ((4, 8),), 2, "w", 256, server_metrics=True)
        level = measure_level(
            endpoint, config.from_env({}), (4, 8), time.monotonic() + 60, workload, "t", server_metrics.OURS_METRICS
        )
    finally:
        server.shutdown()
    assert level["errors"] == 0 and level["output_tokens"] == 16
    assert level["peak_running"] == 4 and level["peak_source"].startswith("serve_batch_peak_size")
    assert 2 <= level["peak_running_polled"] <= 4  # the 100 ms poller saw them too (timing-tolerant on a busy box)
    assert level["prefix_hit_rate"] == 0.64 and level["cached_tokens"] == 8 * 64
    assert (level["prompt_tokens_min"], level["prompt_tokens_max"]) == (100, 100)
