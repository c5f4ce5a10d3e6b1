#!/usr/bin/env python3
"""A local SageMaker Runtime endpoint: answers the runtime API in front of a serving container on this machine.

    python deploy/local_endpoint.py --upstream http://127.0.0.1:8080 --port 8081
    export AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME=http://127.0.0.1:8081

Then the SageMaker SDK (``Predictor(...).predict`` / ``.predict_stream``), boto3's ``sagemaker-runtime`` client
and deploy/invoke.py talk to the container as if it were a deployed endpoint:

- ``InvokeEndpoint`` (POST /endpoints/NAME/invocations) is forwarded to the container's ``/invocations``, with
  ContentType, Accept and CustomAttributes passed through both ways. A container error (4xx/5xx) comes back the
  way the real runtime sends it: a 424 ``ModelError`` carrying the container's status and body, so the SDK
  raises ``ModelError`` with the container's message.
- ``InvokeEndpointWithResponseStream`` (POST /endpoints/NAME/invocations-response-stream) relays the container's
  bytes as they arrive, each read as one ``PayloadPart`` event in AWS event-stream framing (prelude, headers,
  payload, CRC32s); a container that breaks off mid-stream ends it with a ``ModelStreamError`` event.

Requests are not authenticated (any credentials work). Only the standard library is used, so it runs with any
Python 3.9+.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import struct
import sys
import threading
import uuid
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import unquote, urlsplit

PATH = re.compile(r"^/endpoints/(?P<name>[^/]+)/(?P<op>invocations|invocations-response-stream)$")
EVENT_STREAM = "application/vnd.amazon.eventstream"
MODEL_ERROR_TYPE = "ModelError"
VARIANT = "AllTraffic"
READ_SIZE = 64 * 1024
STRING_HEADER = 7  # event-stream header value type: UTF-8 string


def encode_event(headers: dict[str, str], payload: bytes) -> bytes:
    """One AWS event-stream message: prelude (total and header lengths), prelude CRC32, headers, payload, CRC32."""
    encoded = b""
    for name, value in headers.items():
        raw_name, raw_value = name.encode("utf-8"), value.encode("utf-8")
        encoded += struct.pack("!B", len(raw_name)) + raw_name
        encoded += struct.pack("!BH", STRING_HEADER, len(raw_value)) + raw_value
    prelude = struct.pack("!II", 12 + len(encoded) + len(payload) + 4, len(encoded))
    message = prelude + struct.pack("!I", zlib.crc32(prelude)) + encoded + payload
    return message + struct.pack("!I", zlib.crc32(message))


def payload_part(data: bytes) -> bytes:
    """A ``PayloadPart`` event holding ``data`` (its ``Bytes`` member is the event payload)."""
    headers = {":event-type": "PayloadPart", ":content-type": "application/octet-stream", ":message-type": "event"}
    return encode_event(headers, data)


def stream_error(message: str, code: str = "ModelStreamError") -> bytes:
    """An exception event that ends a response stream (botocore raises it as ``ModelStreamError``)."""
    headers = {":exception-type": code, ":content-type": "application/json", ":message-type": "exception"}
    return encode_event(headers, json.dumps({"Message": message, "ErrorCode": code}).encode("utf-8"))


class RuntimeHandler(BaseHTTPRequestHandler):
    """One runtime API request, relayed to the upstream container."""

    protocol_version = "HTTP/1.1"
    server: "LocalRuntime"

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        if self.path == "/ping":  # not part of the runtime API: lets scripts wait for this server
            return self._send_json(200, {"status": "healthy", "upstream": self.server.upstream})
        self._send_error(404, "UnknownOperationException", f"no operation at GET {self.path}")

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        match = PATH.match(urlsplit(self.path).path)
        if not match:
            return self._send_error(404, "UnknownOperationException", f"no operation at POST {self.path}")
        name = unquote(match["name"])
        if self.server.endpoint_name and name != self.server.endpoint_name:
            return self._send_error(
                400,
                "ValidationError",
                f"Endpoint {name} not found (this local endpoint serves {self.server.endpoint_name}).",
            )
        streaming = match["op"] == "invocations-response-stream"
        accept = self.headers.get("X-Amzn-SageMaker-Accept" if streaming else "Accept")
        try:
            upstream = self._forward(body, accept)
        except OSError as error:
            return self._send_model_error(
                None, f"could not reach the model container at {self.server.upstream}: {error}"
            )
        try:
            response = upstream.getresponse()
            if response.status >= 400:
                return self._send_model_error(response.status, response.read().decode("utf-8", "replace"))
            if streaming:
                self._relay_stream(response)
            else:
                self._relay_body(response)
        except (OSError, http.client.HTTPException) as error:
            return self._send_model_error(None, f"the model container did not answer: {error!r}")
        finally:
            upstream.close()
        self.server.log_line(name, match["op"], 200)

    def _forward(self, body: bytes, accept: Optional[str]) -> http.client.HTTPConnection:
        """POST the body to the container's /invocations; returns the open connection."""
        target = urlsplit(self.server.upstream)
        connection = http.client.HTTPConnection(target.hostname, target.port or 80, timeout=self.server.timeout)
        headers = {"Content-Type": self.headers.get("Content-Type") or "application/octet-stream"}
        if accept:
            headers["Accept"] = accept
        for name in ("X-Amzn-SageMaker-Custom-Attributes", "X-Amzn-SageMaker-Inference-Id"):
            if self.headers.get(name):
                headers[name] = self.headers[name]
        connection.request("POST", target.path.rstrip("/") + "/invocations", body=body, headers=headers)
        return connection

    def _relay_body(self, response: http.client.HTTPResponse) -> None:
        data = response.read()
        self.send_response(200)
        self.send_header("Content-Type", response.getheader("Content-Type") or "application/octet-stream")
        self._common_headers(response)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _relay_stream(self, response: http.client.HTTPResponse) -> None:
        """Each read from the container becomes one PayloadPart event, sent as one HTTP chunk at once."""
        self.send_response(200)
        self.send_header("Content-Type", EVENT_STREAM)
        self.send_header("X-Amzn-SageMaker-Content-Type", response.getheader("Content-Type") or "")
        self._common_headers(response)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            while True:
                try:
                    data = response.read1(READ_SIZE)
                except (OSError, http.client.HTTPException) as error:
                    self._write_chunk(stream_error(f"the model container broke off the stream: {error!r}"))
                    break
                if not data:
                    break
                self._write_chunk(payload_part(data))
            self._write_chunk(b"")
        except (BrokenPipeError, ConnectionResetError):  # the client hung up: closing upstream cancels generation
            self.close_connection = True

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _common_headers(self, response: http.client.HTTPResponse) -> None:
        self.send_header("x-Amzn-Invoked-Production-Variant", VARIANT)
        self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        attributes = response.getheader("X-Amzn-SageMaker-Custom-Attributes")
        if attributes:
            self.send_header("X-Amzn-SageMaker-Custom-Attributes", attributes)

    def _send_model_error(self, status: Optional[int], text: str) -> None:
        """The runtime's 424 ModelError: the container's status and body, and a message quoting them."""
        kind = "client" if status is not None and status < 500 else "server"
        message = f'Received {kind} error ({status or "no response"}) from primary with message "{text}".'
        body = {"ErrorCode": f"{kind.upper()}_ERROR_FROM_MODEL", "Message": message, "OriginalMessage": text}
        if status is not None:
            body["OriginalStatusCode"] = status
        self._send_json(424, body, error_type=MODEL_ERROR_TYPE)
        self.server.log_line("-", "error", status or 0)

    def _send_error(self, status: int, error_type: str, message: str) -> None:
        self._send_json(status, {"message": message}, error_type=error_type)

    def _send_json(self, status: int, body: dict, error_type: Optional[str] = None) -> None:
        data = json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if error_type:
            self.send_header("x-amzn-ErrorType", error_type)
        self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's signature
        pass  # LocalRuntime.log_line writes one line per request instead


class LocalRuntime(ThreadingHTTPServer):
    """The HTTP server; ``upstream`` is the container's base URL (``http://host:port``)."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        upstream: str,
        endpoint_name: Optional[str] = None,
        timeout: float = 60.0,
        quiet: bool = False,
    ):
        super().__init__(address, RuntimeHandler)
        self.upstream, self.endpoint_name = upstream.rstrip("/"), endpoint_name
        self.timeout, self.quiet = timeout, quiet

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def handle_error(self, request, client_address) -> None:
        """A client that drops its keep-alive connection is normal; report anything else."""
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)

    def log_line(self, endpoint: str, operation: str, status: int) -> None:
        if not self.quiet:
            sys.stderr.write(f"local-endpoint {endpoint} {operation} -> {status}\n")


def start_in_thread(upstream: str, host: str = "127.0.0.1", port: int = 0, **options) -> LocalRuntime:
    """Start a LocalRuntime on a background thread (port 0: any free port); stop it with ``.shutdown()``."""
    server = LocalRuntime((host, port), upstream, **options)
    threading.Thread(target=server.serve_forever, name="local-endpoint", daemon=True).start()
    return server


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", default="http://127.0.0.1:8080", help="the container (default :8080)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8081, help="port to listen on (default 8081; 0: any)")
    parser.add_argument("--endpoint-name", help="answer only this endpoint name (default: any name)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds to wait on the container, like SageMaker's 60 s (default 60)",
    )
    args = parser.parse_args(argv)
    server = LocalRuntime((args.host, args.port), args.upstream, args.endpoint_name, args.timeout)
    print(f"local SageMaker runtime on {server.url} -> {server.upstream}/invocations", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
