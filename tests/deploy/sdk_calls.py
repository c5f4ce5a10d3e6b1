"""Run by the deploy virtualenv's Python (the SageMaker SDK v2 lives there): SDK calls against an endpoint, their
outcomes printed as one JSON list for the test to check (one process for several calls: the SDK imports slowly).

    python sdk_calls.py ENDPOINT_NAME '[["predict", {payload}], ["stream", {payload}], ...]'

``predict``: ``Predictor(...).predict`` with the JSON serializer/deserializer; prints {"result": ...} or, when the
SDK raises ModelError, {"model_error": message, "code": ..., "original_status": ...}.
``stream``: ``Predictor(...).predict_stream``; prints {"parts": [each PayloadPart's bytes as text]}.
"""

import json
import os
import sys

os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")

import boto3  # noqa: E402
import sagemaker  # noqa: E402
from sagemaker.deserializers import JSONDeserializer  # noqa: E402
from sagemaker.predictor import Predictor  # noqa: E402
from sagemaker.serializers import JSONSerializer  # noqa: E402


def call(predictor, runtime, mode: str, payload: dict) -> dict:
    try:
        if mode == "predict":
            return {"result": predictor.predict(payload, custom_attributes="trace=abc")}
        return {"parts": [part.decode("utf-8") for part in predictor.predict_stream(payload)]}
    except runtime.exceptions.ModelError as error:
        return {
            "model_error": str(error),
            "code": error.response["Error"]["Code"],
            "original_status": error.response.get("OriginalStatusCode"),
            "original_message": error.response.get("OriginalMessage"),
        }


def main() -> None:
    endpoint, calls = sys.argv[1], json.loads(sys.argv[2])
    session = sagemaker.Session(boto_session=boto3.Session(region_name=os.environ["AWS_REGION"]))
    predictor = Predictor(
        endpoint, sagemaker_session=session, serializer=JSONSerializer(), deserializer=JSONDeserializer()
    )
    print(json.dumps([call(predictor, session.sagemaker_runtime_client, mode, payload) for mode, payload in calls]))


if __name__ == "__main__":
    main()
