"""`make docker-test`: wait for a running container's /ping, then send the reference messages request to /invocations.

Usage: python scripts/image/smoke.py [--url http://localhost:8080] [--timeout 600]. Exits non-zero on any failure.
The container must run with MESSAGES_API_ENABLED=true (as `make docker-run` starts it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import requests

REFERENCE_MESSAGES = {
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is deep learning?"},
    ]
}


def wait_for_ping(url: str, timeout: float) -> float:
    """Seconds until /ping answered 200; raise TimeoutError after ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return time.monotonic() - started
        except requests.RequestException:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url}/ping did not answer 200 within {timeout:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://localhost:8080", help="the container's address")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for /ping (model download + load)")
    args = parser.parse_args()
    url = args.url.rstrip("/")
    try:
        print(f"/ping 200 after {wait_for_ping(url, args.timeout):.1f} s")
        response = requests.post(f"{url}/invocations", json=REFERENCE_MESSAGES, timeout=120)
    except (TimeoutError, requests.RequestException) as exc:
        print(f"smoke test failed: {exc}", file=sys.stderr)
        return 1
    if response.status_code != 200 or "choices" not in response.text:
        message = f"/invocations answered {response.status_code}: {response.text[:500]}"
        print(f"smoke test failed: {message}", file=sys.stderr)
        return 1
    print(json.dumps(response.json(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
