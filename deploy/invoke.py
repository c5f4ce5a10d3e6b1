#!/usr/bin/env python3
"""Smoke-test an endpoint with the SageMaker SDK v2: ``predictor.predict`` with the TGI Messages API page's
request, then ``predictor.predict_stream`` printing tokens as they arrive. Exits non-zero when the endpoint
errors (ModelError) or answers with no text.

``--payload messages`` (default) sends OpenAI chat messages (an endpoint with MESSAGES_API_ENABLED);
``--payload inputs`` sends TGI's ``{"inputs": ..., "parameters": ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Iterable

import botocore.exceptions

from common import SEED_MESSAGES, boto_session, log, sagemaker_session, setup_logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--endpoint-name", default=os.environ.get("ENDPOINT_NAME"), help="endpoint to call (default: $ENDPOINT_NAME)"
    )
    parser.add_argument("--region", help="AWS region (default: AWS_REGION / AWS_DEFAULT_REGION)")
    parser.add_argument(
        "--payload",
        choices=("messages", "inputs"),
        default="messages",
        help="request style: OpenAI messages (default) or TGI inputs",
    )
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (default 64)")
    parser.add_argument(
        "--mode",
        choices=("both", "predict", "stream"),
        default="both",
        help="predict, predict_stream, or both (default)",
    )
    args = parser.parse_args(argv)
    if not args.endpoint_name:
        parser.error("--endpoint-name (or ENDPOINT_NAME) is required")
    return args


def build_payload(style: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    """The seed request in either API style."""
    if style == "messages":
        return {"messages": SEED_MESSAGES, "max_tokens": max_tokens, "stream": stream}
    prompt = SEED_MESSAGES[-1]["content"]
    return {"inputs": prompt, "parameters": {"max_new_tokens": max_tokens}, "stream": stream}


def answer_text(result: Any) -> str:
    """The generated text of a chat completion or a TGI ``[{"generated_text": ...}]`` answer."""
    if isinstance(result, list) and result:
        result = result[0]
    if isinstance(result, dict):
        if "choices" in result:
            choice = result["choices"][0]
            return (choice.get("message") or {}).get("content") or choice.get("text") or ""
        if "generated_text" in result:
            return result["generated_text"] or ""
    raise ValueError(f"unexpected answer: {json.dumps(result)[:500]}")


def stream_texts(lines: Iterable[bytes]) -> Iterable[str]:
    """Text pieces from the SSE lines of a chat-completion or TGI stream; raises on an in-band error."""
    for raw in lines:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return
        event = json.loads(data)
        if "error" in event:
            raise RuntimeError(f"stream error: {event['error']}")
        if "choices" in event:
            if event["choices"]:
                delta = event["choices"][0].get("delta") or {}
                yield delta.get("content") or event["choices"][0].get("text") or ""
        elif "token" in event and not (event["token"] or {}).get("special"):
            yield event["token"]["text"]


def run_predict(predictor, args: argparse.Namespace) -> str:
    result = predictor.predict(build_payload(args.payload, args.max_tokens, stream=False))
    print("predict ->", json.dumps(result)[:2000])
    return answer_text(result)


def run_stream(predictor, args: argparse.Namespace) -> str:
    from sagemaker.iterators import LineIterator

    pieces = []
    print("predict_stream -> ", end="", flush=True)
    lines = predictor.predict_stream(build_payload(args.payload, args.max_tokens, stream=True), iterator=LineIterator)
    for piece in stream_texts(lines):
        pieces.append(piece)
        print(piece, end="", flush=True)
    print()
    return "".join(pieces)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    from sagemaker.huggingface import HuggingFacePredictor

    session = sagemaker_session(boto_session(args.region))
    predictor = HuggingFacePredictor(endpoint_name=args.endpoint_name, sagemaker_session=session)
    runs = {"predict": run_predict, "predict_stream": run_stream}
    names = list(runs) if args.mode == "both" else ["predict" if args.mode == "predict" else "predict_stream"]
    for name in names:
        try:
            text = runs[name](predictor, args)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError, RuntimeError, ValueError) as error:
            log.error("%s failed: %s", name, error)
            return 1
        if not text.strip():
            log.error("%s returned no text", name)
            return 1
        log.info("%s ok: %d characters", name, len(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
