"""Adapters registered and unregistered at run time (POST /adapters, DELETE /adapters/{name}) through gunicorn."""

import io
import json
import shutil
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.unit.test_lora import make_adapter, merged_greedy
from tests.helpers import sse_data, start_server

pytestmark = pytest.mark.e2e

HEADER = "X-Amzn-SageMaker-Adapter-Identifier"
ALIAS = "X-Amzn-SageMaker-Adapter-Alias"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def folders(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runtime-adapters")
    made = {
        name: make_adapter(tiny_model_dir, root / name, seed=seed)
        for name, seed in (("a", 1), ("b", 2), ("c", 3), ("d", 4))
    }
    made["wide"] = make_adapter(tiny_model_dir, root / "wide", seed=5, rank=16)
    return made


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    env = {
        "HF_MODEL_ID": str(tiny_model_dir),
        "MAX_CONCURRENT_REQUESTS": "32",
        "MAX_LORA_RANK": "8",
        "DTYPE": "float32",
        "SERVE_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
        "LORA_ADAPTER_ROOTS": str(tmp_path_factory.getbasetemp()),  # where these tests write their adapters
    }
    server = start_server(env, tmp_path_factory.mktemp("logs"))
    yield server
    server.stop()


def register(server, name: str, src, headers: dict = None, params: bool = False) -> requests.Response:
    if params:
        return requests.post(
            server.url + "/adapters", params={"name": name, "src": str(src)}, headers=headers, timeout=120
        )
    return requests.post(
        server.url + "/adapters",
        json={"name": name, "src": str(src), "preload": True, "pin": False},
        headers=headers,
        timeout=120,
    )


def generate_ids(server, headers: dict = None, tokens: int = 8) -> requests.Response:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": tokens, "ignore_eos": True, "details": True}}
    return requests.post(server.url + "/generate", json=body, headers=headers or {}, timeout=120)


def ids(response: requests.Response) -> list[int]:
    assert response.status_code == 200, response.text
    return [token["id"] for token in response.json()["details"]["tokens"]]


def prompt_ids(server) -> list[int]:
    return [
        token["id"] for token in requests.post(server.url + "/tokenize", json={"inputs": PROMPT}, timeout=10).json()
    ]


def test_register_use_delete_then_use_fails(server, folders, tiny_model_dir):
    base = ids(generate_ids(server))
    response = register(server, "a", folders["a"])
    assert response.status_code == 200 and response.text == "Adapter a registered"
    with_a = ids(generate_ids(server, {HEADER: "a"}))
    assert with_a == merged_greedy(tiny_model_dir, folders["a"], prompt_ids(server))[:8] != base
    assert "a" in requests.get(server.url + "/info", timeout=10).json()["adapters"]
    assert register(server, "a", folders["a"]).status_code == 200  # the same src again: nothing to do
    conflict = register(server, "a", folders["b"])
    assert conflict.status_code == 409 and "already registered" in conflict.json()["error"]
    response = requests.delete(server.url + "/adapters/a", timeout=60)
    assert response.status_code == 200 and response.text == "Adapter a unregistered"
    gone = generate_ids(server, {HEADER: "a"})
    assert gone.status_code == 422 and "adapter 'a' is not loaded" in gone.json()["error"]
    missing = requests.delete(server.url + "/adapters/a", timeout=60)
    assert missing.status_code == 404 and missing.json()["error"] == "adapter 'a' was not found"
    assert ids(generate_ids(server)) == base


def _tar(target: Path, members: dict[str, Path]) -> Path:
    with tarfile.open(target, "w:gz") as tar:
        for arcname, path in members.items():
            tar.add(path, arcname=arcname)
    return target


def test_query_parameters_a_tar_gz_and_the_alias_header(server, folders, tmp_path):
    expected = ids(_with_adapter(server, "b", folders["b"]))
    archive = _tar(tmp_path / "adapter.tar.gz", {p.name: p for p in folders["b"].iterdir()})
    response = register(server, "b-tar", archive, headers={ALIAS: "b-alias"}, params=True)
    assert response.status_code == 200 and response.text == "Adapter b-alias registered"
    assert ids(generate_ids(server, {ALIAS: "b-alias"})) == ids(generate_ids(server, {HEADER: "b-tar"})) == expected
    artifact = tmp_path / "artifact"  # SageMaker's adapter component: a folder holding the downloaded archive
    artifact.mkdir()
    _tar(artifact / "model.tar.gz", {"weights": folders["b"]})  # the peft files one folder down
    assert register(server, "b-folder", artifact).status_code == 200
    assert ids(generate_ids(server, {HEADER: "b-folder"})) == expected
    unpacked = tmp_path / "unpacked"  # an artifact already unpacked, its peft files one folder down
    shutil.copytree(folders["b"], unpacked / "adapter")
    assert register(server, "b-unpacked", unpacked).status_code == 200
    assert ids(generate_ids(server, {HEADER: "b-unpacked"})) == expected
    for name in ("b", "b-tar", "b-folder", "b-unpacked"):
        assert requests.delete(server.url + f"/adapters/{name}", timeout=60).status_code == 200


def _with_adapter(server, name, folder) -> requests.Response:
    assert register(server, name, folder).status_code == 200
    return generate_ids(server, {HEADER: name})


def test_errors_are_4xx_naming_the_problem(server, folders, tmp_path):
    cases = [
        ({"src": str(folders["a"])}, 400, "name: required"),
        ({"name": "", "src": str(folders["a"])}, 400, "name: must be a non-empty string"),
        ({"name": "x", "src": ""}, 400, "src: must be a non-empty string"),
        ({"name": "x", "src": str(tmp_path / "nowhere")}, 400, "does not exist"),
        ({"name": "x", "src": str(tmp_path)}, 400, "adapter weights missing"),
        ({"name": "x", "src": str(folders["wide"])}, 400, "greater than MAX_LORA_RANK=8"),
    ]
    for body, status, message in cases:
        response = requests.post(server.url + "/adapters", json=body, timeout=60)
        assert response.status_code == status and message in response.json()["error"], (body, response.text)
    no_weights = tmp_path / "config-only"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text((folders["a"] / "adapter_config.json").read_text())
    response = register(server, "x", no_weights)
    assert response.status_code == 400 and "adapter_model.safetensors" in response.json()["error"]
    assert requests.post(server.url + "/adapters", data="nonsense", timeout=10).status_code == 400
    nested = requests.post(server.url + "/adapters", data=b"[" * 100_000 + b"]" * 100_000, timeout=10)
    assert nested.status_code == 400 and "JSON object" in nested.json()["error"]
    assert "x" not in requests.get(server.url + "/info", timeout=10).json()["adapters"]


def test_unsafe_archives_are_refused(server, tmp_path):
    outside = tmp_path / "escaped"
    for member, message in (
        ("../escaped", "cannot be unpacked safely"),
        ("/tmp/escaped-absolute", "holds no adapter_config"),
    ):
        archive = tmp_path / f"evil-{len(message)}.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            info = tarfile.TarInfo(member)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"hi"))
        response = register(server, "evil", archive)  # an absolute name lands inside the target, stripped of its '/'
        assert response.status_code == 400 and message in response.json()["error"], response.text
    linked = tmp_path / "link.tar.gz"
    with tarfile.open(linked, "w:gz") as tar:
        info = tarfile.TarInfo("adapter_config.json")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    response = register(server, "evil", linked)
    assert response.status_code == 400 and "cannot be unpacked safely" in response.json()["error"], response.text
    assert not outside.exists() and not Path("/tmp/escaped-absolute").exists()


LONG_STREAM = 440  # with the prompt, within the tiny model's 512 positions


def test_running_requests_finish_before_the_delete_and_new_ones_fail(server, folders):
    assert register(server, "c", folders["c"]).status_code == 200
    # long enough to still run while the delete waits (a tiny model on an idle machine makes ~1,000 tokens/s)
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": LONG_STREAM, "ignore_eos": True}, "stream": True}
    stream = requests.post(server.url + "/generate_stream", json=body, headers={HEADER: "c"}, stream=True, timeout=120)
    lines = stream.iter_lines(decode_unicode=True)
    assert next(line for line in lines if line.startswith("data:"))  # running: its first token is out
    deleted = {}
    deleter = threading.Thread(
        target=lambda: deleted.update(r=requests.delete(server.url + "/adapters/c", timeout=120))
    )
    deleter.start()
    time.sleep(0.2)
    refused = generate_ids(server, {HEADER: "c"})
    assert refused.status_code == 422 and "adapter 'c' is not loaded" in refused.json()["error"]
    assert deleter.is_alive()  # still waiting on the running stream
    events = sse_data("\n".join(lines))
    deleter.join(60)
    assert deleted["r"].status_code == 200
    final = json.loads(events[-1])
    assert final["index"] == LONG_STREAM and final["generated_text"]  # every token, on the adapter it started with


def test_twenty_requests_over_three_adapters_while_one_is_registered_and_another_deleted(server, folders):
    for name in ("a", "b", "c"):
        assert register(server, name, folders[name]).status_code == 200
    expected = {name: ids(generate_ids(server, {HEADER: name}, tokens=24)) for name in ("a", "b", "c")}
    pings: list[float] = []

    def ping_while(stop: threading.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            assert requests.get(server.url + "/ping", timeout=5).status_code == 200
            pings.append(time.monotonic() - started)
            time.sleep(0.05)

    stop = threading.Event()
    pinger = threading.Thread(target=ping_while, args=(stop,))
    pinger.start()
    with ThreadPoolExecutor(24) as pool:
        names = ["a", "b", "c"] * 7
        futures = [pool.submit(generate_ids, server, {HEADER: name}, 24) for name in names[:20]]
        time.sleep(0.3)
        added = pool.submit(register, server, "d", folders["d"])
        removed = pool.submit(requests.delete, server.url + "/adapters/c", timeout=120)
        results = [future.result() for future in futures]
        assert added.result().status_code == 200 and removed.result().status_code == 200
    stop.set()
    pinger.join()
    for name, response in zip(names, results):
        if name == "c" and response.status_code == 422:  # admitted after the delete began
            continue
        assert ids(response) == expected[name], name
    assert sum(response.status_code == 200 for response in results) >= 14
    assert ids(generate_ids(server, {HEADER: "d"})) != expected["a"]
    assert generate_ids(server, {HEADER: "c"}).status_code == 422
    assert pings and max(pings) < 2.0


def test_the_adapter_routes_are_documented(server):
    paths = requests.get(server.url + "/openapi.json", timeout=10).json()["paths"]
    register_op, delete_op = paths["/adapters"]["post"], paths["/adapters/{name}"]["delete"]
    assert register_op["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/RegisterAdapter"
    }
    assert {"200", "400", "409"} <= set(register_op["responses"]) and "text/plain" in register_op["responses"]["200"][
        "content"
    ]
    assert delete_op["parameters"][0]["name"] == "name" and delete_op["parameters"][0]["in"] == "path"
    assert {"200", "404"} <= set(delete_op["responses"]) and delete_op["operationId"] == "delete_adapters_name"


def test_with_replicas_every_engine_copy_gets_the_adapter(replica_server, folders):
    replicas = replica_server  # shared with test_replicas.py: what this test registers, it deletes
    try:
        assert register(replicas, "a", folders["a"]).status_code == 200
        with ThreadPoolExecutor(4) as pool:  # concurrent requests spread over both engines
            answers = list(pool.map(lambda _: ids(generate_ids(replicas, {HEADER: "a"})), range(4)))
        engines = requests.get(replicas.url + "/info", timeout=10).json()["engines"]
        assert all(engine["served"] >= 1 for engine in engines) and len(engines) == 2
        assert all(answer == answers[0] for answer in answers) and answers[0] != ids(generate_ids(replicas))
    finally:
        deleted = requests.delete(replicas.url + "/adapters/a", timeout=60)
    assert deleted.status_code == 200
    assert generate_ids(replicas, {HEADER: "a"}).status_code == 422


def _strict_json(text: str) -> dict:
    """The body parsed as JSON proper: a bare NaN or Infinity is an error, as it is for every other JSON reader."""

    def refuse(constant: str) -> None:
        raise ValueError(f"the body holds a bare {constant}")

    return json.loads(text, parse_constant=refuse)


def test_hostile_registers_are_4xx_and_the_server_stays_healthy(server, folders, tmp_path):
    bad_config = tmp_path / "bad-config"
    shutil.copytree(folders["a"], bad_config)
    (bad_config / "adapter_config.json").write_text('{"r": "abc", "lora_alpha": 16}')
    cases = [
        ({"name": "z", "src": "/dev/zero"}, 400, "adapters are read only from inside"),
        ({"name": "z", "src": "/proc/self/fd/0"}, 400, "adapters are read only from inside"),
        ({"name": "z", "src": "/" + "a" * 5000}, 400, "at most 1024 characters"),
        ({"name": "a/b", "src": str(folders["a"])}, 400, "is not a valid adapter name"),
        ({"name": "a\nforged", "src": str(folders["a"])}, 400, "is not a valid adapter name"),
        ({"name": "z", "src": str(bad_config)}, 400, "r must be a positive integer, not 'abc'"),
    ]
    for body, status, message in cases:
        response = requests.post(server.url + "/adapters", json=body, timeout=60)
        assert response.status_code == status and message in response.json()["error"], (body, response.text)
    burst = [{**body, "name": f"{body['name']}{i}"} for i in range(4) for body, _, _ in cases]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda body: requests.post(server.url + "/adapters", json=body, timeout=60), burst))
        pings = [requests.get(server.url + "/ping", timeout=10).status_code for _ in range(5)]
    assert all(response.status_code in (400, 429) for response in answers), [r.text for r in answers]
    assert pings == [200] * 5 and "z" not in requests.get(server.url + "/info", timeout=10).json()["adapters"]
    assert "forged" not in server.log_path.read_text()


def test_an_adapter_producing_nan_fails_alone_with_a_json_error(server, tiny_model_dir, tmp_path):
    from tests.unit.test_lora import _huge_adapter

    assert register(server, "huge", _huge_adapter(tiny_model_dir, tmp_path / "huge")).status_code == 200
    try:
        body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 4, "details": True, "decoder_input_details": True}}
        with ThreadPoolExecutor(2) as pool:
            broken = pool.submit(
                requests.post, server.url + "/generate", json=body, headers={HEADER: "huge"}, timeout=60
            )
            base = pool.submit(generate_ids, server)
        assert broken.result().status_code >= 400 and "not finite" in _strict_json(broken.result().text)["error"]
        assert base.result().status_code == 200 and _strict_json(base.result().text)["details"]["tokens"]
    finally:
        assert requests.delete(server.url + "/adapters/huge", timeout=60).status_code == 200
