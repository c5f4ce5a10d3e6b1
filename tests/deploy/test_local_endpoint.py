"""deploy/local_endpoint.py: AWS event-stream framing checked by botocore's own parser, and the real SageMaker SDK
(predict / predict_stream) and boto3 talking through it to our real server (entrypoint + gunicorn, tiny model)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from botocore.eventstream import ChecksumMismatch, EventStream, EventStreamBuffer, EventStreamError
from botocore.parsers import EventStreamJSONParser

from deploy.local_endpoint import encode_event, payload_part, stream_error, start_in_thread
from tests.deploy.conftest import aws_env, client
from tests.helpers import ROOT, free_port, sse_data

pytestmark = pytest.mark.e2e

SEED = {
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is deep learning?"},
    ]
}


def parse_messages(data: bytes) -> list:
    buffer = EventStreamBuffer()
    buffer.add_data(data)
    return list(buffer)


class _Raw:
    """A stand-in for urllib3's response: what botocore's EventStream reads bytes from."""

    def __init__(self, data: bytes, piece: int = 7):
        self.data, self.piece = data, piece

    def stream(self):
        for start in range(0, len(self.data), self.piece):
            yield self.data[start : start + self.piece]


def runtime_events(data: bytes) -> list[dict]:
    """Parse a response body as botocore does for InvokeEndpointWithResponseStream."""
    import botocore.session

    model = botocore.session.get_session().get_service_model("sagemaker-runtime")
    shape = model.operation_model("InvokeEndpointWithResponseStream").output_shape.members["Body"]
    return list(EventStream(_Raw(data), shape, EventStreamJSONParser(), "InvokeEndpointWithResponseStream"))


def test_encoded_message_has_the_aws_layout_and_parses():
    message = encode_event({":event-type": "PayloadPart", "x": "é"}, b"hello")
    total, header_length, prelude_crc = (
        int.from_bytes(message[:4], "big"),
        int.from_bytes(message[4:8], "big"),
        int.from_bytes(message[8:12], "big"),
    )
    assert total == len(message) and prelude_crc == zlib.crc32(message[:8])
    assert int.from_bytes(message[-4:], "big") == zlib.crc32(message[:-4])
    assert header_length == len(message) - 16 - len(b"hello")
    (parsed,) = parse_messages(message)
    assert parsed.payload == b"hello" and parsed.headers == {":event-type": "PayloadPart", "x": "é"}


def test_corrupted_message_fails_botocore_checksum():
    message = bytearray(payload_part(b"data: {}\n\n"))
    message[-6] ^= 0xFF
    with pytest.raises(ChecksumMismatch):
        parse_messages(bytes(message))


def test_payload_parts_parse_as_sagemaker_runtime_events_across_read_boundaries():
    pieces = [b'data: {"a"', b": 1}\n\n", "data: é\n\n".encode(), b""]
    events = runtime_events(b"".join(payload_part(piece) for piece in pieces))
    assert [event["PayloadPart"]["Bytes"] for event in events] == pieces


def test_stream_error_is_raised_as_model_stream_error():
    with pytest.raises(EventStreamError) as info:
        runtime_events(payload_part(b"partial") + stream_error("container went away"))
    assert info.value.response["Error"]["Code"] == "ModelStreamError"
    assert "container went away" in info.value.response["Error"]["Message"]


def sdk(deploy_python, runtime, calls: list, endpoint: str = "llm-endpoint") -> list[dict]:
    """SDK calls from the deploy virtualenv through ``runtime``; each call's outcome as a dict."""
    env = aws_env("http://127.0.0.1:9", runtime.url)  # control plane unused here; port 9 refuses connections
    result = subprocess.run(
        [str(deploy_python), str(ROOT / "tests" / "deploy" / "sdk_calls.py"), endpoint, json.dumps(calls)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def messages_calls(deploy_python, messages_runtime) -> list[dict]:
    """predict, predict_stream, and both with a TGI payload the Messages API rejects (one SDK process)."""
    inputs = {"inputs": "What is deep learning?"}
    return sdk(
        deploy_python,
        messages_runtime,
        [
            ["predict", {**SEED, "max_tokens": 12}],
            ["stream", {**SEED, "max_tokens": 12, "stream": True}],
            ["predict", inputs],
            ["stream", {**inputs, "stream": True}],
        ],
    )


@pytest.fixture(scope="module")
def tgi_calls(deploy_python, tgi_runtime) -> list[dict]:
    payload = {"inputs": "What is deep learning?", "parameters": {"max_new_tokens": 8}}
    return sdk(deploy_python, tgi_runtime, [["predict", payload], ["stream", {**payload, "stream": True}]])


def test_sdk_predict_messages_api(messages_calls):
    completion = messages_calls[0]["result"]
    assert completion["object"] == "chat.completion"
    assert completion["choices"][0]["message"]["role"] == "assistant"
    assert completion["usage"]["completion_tokens"] >= 1


def test_sdk_predict_stream_messages_api(messages_calls):
    parts = messages_calls[1]["parts"]
    assert len(parts) >= 2  # relayed as the server wrote it, not as one buffered body
    events = sse_data("".join(parts))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def test_sdk_predict_and_stream_tgi(tgi_calls):
    assert isinstance(tgi_calls[0]["result"], list) and tgi_calls[0]["result"][0]["generated_text"]
    events = [json.loads(event) for event in sse_data("".join(tgi_calls[1]["parts"])) if event != "[DONE]"]
    assert len([e for e in events if "token" in e]) == 8
    assert events[-1]["generated_text"]


def test_sdk_raises_model_error_with_our_message(messages_calls):
    predict_error, stream_error_ = messages_calls[2], messages_calls[3]
    assert predict_error["code"] == "ModelError" and predict_error["original_status"] == 422
    assert "MESSAGES_API_ENABLED is true" in predict_error["model_error"]
    assert "MESSAGES_API_ENABLED is true" in json.loads(predict_error["original_message"])["error"]
    assert stream_error_["code"] == "ModelError" and "MESSAGES_API_ENABLED is true" in stream_error_["model_error"]


def test_boto3_passes_content_type_and_accept_through(messages_runtime):
    runtime = client("sagemaker-runtime", messages_runtime.url)
    answer = runtime.invoke_endpoint(
        EndpointName="any-name",
        Body=json.dumps({**SEED, "max_tokens": 4}),
        ContentType="application/json",
        Accept="application/json",
        CustomAttributes="trace=1",
    )
    assert answer["ContentType"].startswith("application/json")
    assert answer["InvokedProductionVariant"] == "AllTraffic"
    assert json.loads(answer["Body"].read())["object"] == "chat.completion"
    stream = runtime.invoke_endpoint_with_response_stream(
        EndpointName="any-name",
        ContentType="application/json",
        Body=json.dumps({**SEED, "max_tokens": 4, "stream": True}),
    )
    assert stream["ContentType"].startswith("text/event-stream")
    body = b"".join(event["PayloadPart"]["Bytes"] for event in stream["Body"])
    assert sse_data(body.decode())[-1] == "[DONE]"


def test_unreachable_container_and_unknown_endpoint_are_runtime_errors():
    runtime_server = start_in_thread(f"http://127.0.0.1:{free_port()}", endpoint_name="mine", quiet=True)
    try:
        runtime = client("sagemaker-runtime", runtime_server.url)
        with pytest.raises(runtime.exceptions.ModelError, match="could not reach the model container"):
            runtime.invoke_endpoint(EndpointName="mine", Body=b"{}", ContentType="application/json")
        with pytest.raises(runtime.exceptions.ValidationError, match="Endpoint other not found"):
            runtime.invoke_endpoint(EndpointName="other", Body=b"{}", ContentType="application/json")
    finally:
        runtime_server.shutdown()


def test_help():
    result = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "local_endpoint.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "--upstream" in result.stdout and "InvokeEndpointWithResponseStream" in result.stdout


class _Recorder(BaseHTTPRequestHandler):
    """A container double that records what reached /invocations and answers with custom headers; a body of
    ``break`` makes it send one chunk of a stream and hang up."""

    protocol_version = "HTTP/1.1"
    seen: list = []

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Recorder.seen.append((self.path, dict(self.headers), body))
        if body == b"break":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"5\r\nhello\r\n")
            self.wfile.flush()
            self.close_connection = True
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/x-custom")
        attributes = self.headers.get("X-Amzn-SageMaker-Custom-Attributes", "")
        self.send_header("X-Amzn-SageMaker-Custom-Attributes", "echo=" + attributes)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def recorder():
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    runtime_server = start_in_thread(f"http://127.0.0.1:{upstream.server_address[1]}", quiet=True)
    _Recorder.seen.clear()
    yield client("sagemaker-runtime", runtime_server.url)
    runtime_server.shutdown()
    upstream.shutdown()


def test_headers_pass_through_both_ways(recorder):
    answer = recorder.invoke_endpoint(
        EndpointName="ep",
        Body=b"a,b\n",
        ContentType="text/csv",
        Accept="application/jsonlines",
        CustomAttributes="trace=1",
    )
    path, headers, body = _Recorder.seen[-1]
    assert (path, body) == ("/invocations", b"a,b\n")
    assert headers["Content-Type"] == "text/csv" and headers["Accept"] == "application/jsonlines"
    assert headers["X-Amzn-SageMaker-Custom-Attributes"] == "trace=1"
    assert answer["ContentType"] == "application/x-custom" and answer["CustomAttributes"] == "echo=trace=1"
    assert answer["Body"].read() == b"a,b\n"
    stream = recorder.invoke_endpoint_with_response_stream(
        EndpointName="ep", Body=b"x", ContentType="text/plain", Accept="text/event-stream"
    )
    assert _Recorder.seen[-1][1]["Accept"] == "text/event-stream"
    assert stream["ContentType"] == "application/x-custom"
    assert b"".join(event["PayloadPart"]["Bytes"] for event in stream["Body"]) == b"x"


def test_container_hanging_up_mid_stream_ends_with_model_stream_error(recorder):
    stream = recorder.invoke_endpoint_with_response_stream(EndpointName="ep", Body=b"break", ContentType="text/plain")
    events = iter(stream["Body"])
    assert next(events)["PayloadPart"]["Bytes"] == b"hello"
    with pytest.raises(EventStreamError) as info:
        next(events)
    assert info.value.response["Error"]["Code"] == "ModelStreamError"
    assert "broke off the stream" in info.value.response["Error"]["Message"]
