"""Runtime adapters as an attacker or a careless operator would register them: sources outside the allowed roots,
devices and FIFOs, archive bombs, too many adapters, names that shadow others or forge log lines, registers that
never end. The registry runs against fake engine copies (no model): what is tested is the front's part."""

from __future__ import annotations

import io
import os
import tarfile
import threading
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st

from serve.config import Settings, SettingsError, load_settings
from serve.engine.adapters import AdapterError, AdapterNotLoaded
from serve.errors import BadRequest, Overloaded, PayloadTooLarge, Unauthorized
from serve.http.security import check_api_key
from serve.sagemaker import adapters as registry_module
from serve.sagemaker.adapter_sources import RegisterTimeout
from serve.sagemaker.adapters import AdapterConflict, AdapterRegistry, check_name

CAP = 64 * 1024  # MAX_LORA_ADAPTER_BYTES in these tests


class FakeCopy:
    """An engine copy: records which folder each adapter name was installed from, as the real one reads it."""

    def __init__(self) -> None:
        self.installed: dict[str, str] = {}
        self.busy: set[str] = set()
        self.refuse: str | None = None
        self.pending: list[Future] = []
        self.hold = False

    def install_adapter(self, name: str, number: int, folder: str, max_rank: int | None = None) -> Future:
        done: Future = Future()
        if self.hold:
            self.pending.append(done)
            done.add_done_callback(lambda f: f.exception() or self.installed.__setitem__(name, folder))
            return done
        if self.refuse:
            done.set_exception(AdapterError(self.refuse))
        elif name in self.installed:
            done.set_exception(AdapterError(f"adapter {name!r} is already loaded"))
        else:
            self.installed[name] = folder
            done.set_result(None)
        return done

    def retire_adapter(self, name: str) -> Future:
        self.installed.pop(name)
        done: Future = Future()
        done.set_result(None)
        return done

    def uses_adapter(self, name: str) -> bool:
        return name in self.busy


class FakePool:
    ready = True

    def __init__(self, copies: int = 2) -> None:
        self.engines = [FakeCopy() for _ in range(copies)]
        self.loaded = SimpleNamespace(adapters={})


def peft_folder(folder: Path, weights: bytes = b"w" * 16) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text('{"r": 8}')
    (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


@pytest.fixture
def roots(tmp_path) -> SimpleNamespace:
    base = Path(os.path.realpath(tmp_path))
    allowed = base / "allowed"
    allowed.mkdir()
    return SimpleNamespace(base=base, allowed=allowed, cache=base / "cache", outside=base / "outside")


def make_registry(roots: SimpleNamespace, copies: int = 2, max_adapters: int = 16) -> AdapterRegistry:
    settings = Settings(
        model_dir=str(roots.base / "model"),
        cache_dir=str(roots.cache),
        lora_adapter_roots=(str(roots.allowed),),
        max_lora_adapters=max_adapters,
        max_lora_adapter_bytes=CAP,
    )
    return AdapterRegistry(FakePool(copies), settings)


def refusal(registry: AdapterRegistry, src: str, name: str = "x") -> BadRequest:
    with pytest.raises(BadRequest) as caught:
        registry.register(name, src)
    return caught.value


def test_paths_outside_the_roots_get_one_error_whether_they_exist_or_not(roots):
    registry = make_registry(roots)
    peft_folder(roots.outside / "real")
    (roots.allowed / "escape").symlink_to(roots.outside / "real")
    sources = ["/dev/zero", "/proc/self/fd/0", "/etc/passwd", "/no/such/path", str(roots.outside / "real")]
    sources += [str(roots.allowed / "escape"), str(roots.outside / "absent")]
    messages = {refusal(registry, src).message.replace(src, "SRC") for src in sources}
    assert len(messages) == 1 and "adapters are read only from inside" in messages.pop()
    assert not any(copy.installed for copy in registry._engine.engines)


def test_devices_fifos_and_links_out_inside_a_root_are_refused(roots):
    registry = make_registry(roots)
    os.mkfifo(roots.allowed / "pipe.tar.gz")
    assert "is not a regular file" in refusal(registry, str(roots.allowed / "pipe.tar.gz")).message
    linked = peft_folder(roots.allowed / "linked")
    (linked / "adapter_model.safetensors").unlink()
    (linked / "adapter_model.safetensors").symlink_to("/dev/zero")
    assert "links outside" in refusal(registry, str(linked)).message
    fifo = peft_folder(roots.allowed / "fifo")
    (fifo / "adapter_config.json").unlink()
    os.mkfifo(fifo / "adapter_config.json")
    assert "is not a regular file" in refusal(registry, str(fifo)).message


def test_long_sources_and_dot_dot_are_refused_before_any_lookup(roots):
    registry = make_registry(roots)
    assert "at most 1024 characters" in refusal(registry, "/" + "a" * 5000).message
    assert "'..'" in refusal(registry, str(roots.allowed / ".." / "outside")).message
    inside_missing = refusal(registry, str(roots.allowed / "nowhere"))
    assert "does not exist" in inside_missing.message and inside_missing.param == "src"


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_an_archive_bomb_is_a_413_and_leaves_nothing_on_disk(roots):
    registry = make_registry(roots)
    bomb = _tar(roots.allowed / "bomb.tar.gz", {"adapter_config.json": b"{}", "zeros": bytes(CAP * 16)})
    assert bomb.stat().st_size < CAP  # small on disk, sixteen times the cap unpacked
    with pytest.raises(PayloadTooLarge, match="unpacks to more than MAX_LORA_ADAPTER_BYTES"):
        registry.register("bomb", str(bomb))
    many = _tar(roots.allowed / "many.tar.gz", {f"f{i}": b"x" for i in range(300)})
    with pytest.raises(PayloadTooLarge, match="more than 256 members"):
        registry.register("many", str(many))
    assert list((roots.cache / "adapters").iterdir()) == []
    assert registry.names() == ()


def test_sizes_and_file_counts_are_checked_before_reading(roots):
    registry = make_registry(roots)
    heavy = peft_folder(roots.allowed / "heavy", weights=bytes(CAP + 1))
    with pytest.raises(PayloadTooLarge, match="more than MAX_LORA_ADAPTER_BYTES"):
        registry.register("heavy", str(heavy))
    crowded = roots.allowed / "crowded"
    crowded.mkdir()
    for i in range(300):
        (crowded / f"f{i}").touch()
    with pytest.raises(PayloadTooLarge, match="more than 256 entries"):
        registry.register("crowded", str(crowded))


def test_a_deleted_or_failed_adapter_leaves_no_files(roots):
    registry = make_registry(roots)
    source = peft_folder(roots.outside / "peft")
    archive = _tar(roots.allowed / "a.tar.gz", {p.name: p.read_bytes() for p in source.iterdir()})
    assert registry.register("packed", str(archive))
    unpacked = list((roots.cache / "adapters").iterdir())
    assert len(unpacked) == 1 and all(copy.installed["packed"] == str(unpacked[0]) for copy in registry._engine.engines)
    registry.unregister("packed")
    assert list((roots.cache / "adapters").iterdir()) == []
    registry._engine.engines[1].refuse = "adapter 'broken': lora_A must be a 2-D matrix"
    with pytest.raises(BadRequest, match="src: adapter 'broken': lora_A must be a 2-D matrix"):
        registry.register("broken", str(archive))
    assert list((roots.cache / "adapters").iterdir()) == [] and registry.names() == ()
    assert all("broken" not in copy.installed for copy in registry._engine.engines)  # retired where it got in


@pytest.mark.parametrize("name", ["a/b", "a\nforged log line", "", "x" * 65, "-lead", "..", "sp ace", "é"])
def test_names_outside_the_safe_charset_are_refused(roots, name):
    registry = make_registry(roots)
    peft_folder(roots.allowed / "ok")
    with pytest.raises(BadRequest) as caught:
        registry.register(name, str(roots.allowed / "ok"))
    assert caught.value.param == "name"
    with pytest.raises(BadRequest) as caught:
        registry.register("fine", str(roots.allowed / "ok"), alias=name or "\n")
    assert caught.value.param == "alias"
    assert check_name("Llama-3.1_sql", "name") == "Llama-3.1_sql"


def test_an_alias_never_shadows_another_adapters_name(roots):
    registry = make_registry(roots)
    alpha, beta = peft_folder(roots.allowed / "alpha"), peft_folder(roots.allowed / "beta")
    assert registry.register("alpha1", str(alpha), alias="beta1")
    with pytest.raises(AdapterConflict, match="'beta1' is the alias of adapter 'alpha1'"):
        registry.register("beta1", str(beta))
    with pytest.raises(AdapterConflict, match="alias: 'alpha1' is already taken"):
        registry.register("gamma", str(beta), alias="alpha1")
    assert registry.resolve("beta1") == "alpha1"


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("register"), st.sampled_from("abcd"), st.integers(0, 2), st.sampled_from([None, *"abcd"])),
        st.tuples(st.just("delete"), st.sampled_from("abcd")),
        st.tuples(st.just("use"), st.sampled_from("abcd")),
    ),
    max_size=25,
)


@hypothesis_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_a_name_selects_exactly_its_adapters_weights_after_any_sequence(tmp_path_factory, ops):
    base = Path(os.path.realpath(tmp_path_factory.mktemp("namespace")))
    roots = SimpleNamespace(base=base, allowed=base / "allowed", cache=base / "cache", outside=base / "outside")
    sources = [str(peft_folder(roots.allowed / f"src{i}")) for i in range(3)]
    registry = make_registry(roots)
    model: dict[str, tuple[str, str | None]] = {}  # name -> (src, alias)
    for op in ops:
        if op[0] == "register":
            _register_step(registry, model, op[1], sources[op[2]], op[3])
        elif op[0] == "delete":
            _delete_step(registry, model, op[1])
        for key in "abcd":
            _check_selection(registry, model, key, sources)


def _register_step(registry, model, name, src, alias) -> None:
    """Predict the outcome from the model: the same register again is a no-op, a taken name or alias a 409."""
    alias = None if alias == name else alias
    taken = {key for entry, (_, other) in model.items() for key in (entry, other) if key}
    if model.get(name) == (src, alias):
        assert registry.register(name, src, alias) is False
    elif name in taken or alias in taken:
        with pytest.raises(AdapterConflict):
            registry.register(name, src, alias)
    else:
        assert registry.register(name, src, alias) is True
        model[name] = (src, alias)


def _delete_step(registry, model, name) -> None:
    try:
        registry.unregister(name)
    except Exception:  # noqa: BLE001 - NotFound for a name that is not registered
        assert name not in model
        return
    del model[name]


def _check_selection(registry, model, key, sources) -> None:
    """``key`` selects the adapter the model says (by name, else by alias) and its copies hold that src."""
    expected = key if key in model else next((name for name, (_, alias) in model.items() if alias == key), None)
    assert registry.resolve(key) == expected
    if expected is not None:
        for copy in registry._engine.engines:
            assert copy.installed[expected] == model[expected][0]
    assert set(registry.names()) == set(model)


def test_max_lora_adapters_evicts_the_least_recently_used_idle_one(roots):
    registry = make_registry(roots, max_adapters=2)
    folders = {name: str(peft_folder(roots.allowed / name)) for name in "abcd"}
    registry.register("a", folders["a"])
    registry.register("b", folders["b"])
    with registry.admitting("a"):  # a request on "a": "b" is now the least recently used
        pass
    registry.register("c", folders["c"])
    assert registry.names() == ("a", "c")
    assert all(set(copy.installed) == {"a", "c"} for copy in registry._engine.engines)
    with pytest.raises(AdapterNotLoaded):
        with registry.admitting("b"):
            pass
    for copy in registry._engine.engines:
        copy.busy = {"a", "c"}
    with pytest.raises(AdapterConflict, match="MAX_LORA_ADAPTERS=2 adapters are loaded and every one is in use"):
        registry.register("d", folders["d"])
    assert registry.names() == ("a", "c")


def test_registers_run_in_bounded_workers_with_a_timeout(roots, monkeypatch):
    registry = make_registry(roots, copies=1)
    copy = registry._engine.engines[0]
    copy.hold = True  # installs answer only when the test says so
    folders = [str(peft_folder(roots.allowed / f"slow{i}")) for i in range(3)]
    results: dict[int, object] = {}

    def run(i: int) -> None:
        try:
            results[i] = registry.register(f"slow{i}", folders[i])
        except Exception as exc:  # noqa: BLE001
            results[i] = exc

    workers = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for worker in workers:
        worker.start()
    while len(copy.pending) < 2:
        threading.Event().wait(0.01)
    with pytest.raises(Overloaded, match="adapter registrations are running already"):
        registry.register("slow2", folders[2])
    for done in copy.pending:
        done.set_result(None)
    for worker in workers:
        worker.join(10)
    assert results == {0: True, 1: True}
    copy.pending.clear()
    monkeypatch.setattr(registry_module, "REGISTER_TIMEOUT", 0.05)
    with pytest.raises(RegisterTimeout, match="took longer than"):
        registry.register("slow2", folders[2])
    with pytest.raises(AdapterConflict, match="being deleted; retry"):  # reserved until the copy answers
        registry.register("slow2", folders[2])
    copy.pending[0].set_result(None)  # the copy installed it after all: it is retired and the name is free
    assert "slow2" not in copy.installed
    copy.hold = False
    assert registry.register("slow2", folders[2]) and registry.resolve("slow2") == "slow2"


def test_the_adapter_routes_need_the_api_key_like_other_management_routes():
    for path in ("/adapters", "/adapters/sql"):
        with pytest.raises(Unauthorized):
            check_api_key("secret-key", path, None)
        check_api_key("secret-key", path, "Bearer secret-key")


def test_the_adapter_settings_are_read_and_checked():
    settings = load_settings({"LORA_ADAPTER_ROOTS": "/srv/a, /srv/b:/srv/c", "MAX_LORA_ADAPTERS": "3"})
    assert settings.lora_adapter_roots == ("/srv/a", "/srv/b", "/srv/c") and settings.max_lora_adapters == 3
    assert load_settings({}).max_lora_adapter_bytes == 1 << 30
    with pytest.raises(SettingsError, match="LORA_ADAPTER_ROOTS: 'relative' is not an absolute path"):
        load_settings({"LORA_ADAPTER_ROOTS": "relative"})
