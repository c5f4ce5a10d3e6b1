"""Where a runtime adapter may be read from, and reading it without exhausting anything.

``find_adapter`` turns the ``src`` of POST /adapters into the peft folder every engine copy reads:

- only inside the allowed roots (the model folder and its ``adapters/``, ``SERVE_CACHE_DIR``, and the folders in
  ``LORA_ADAPTER_ROOTS``), judged after links are resolved, with one and the same error for every path outside
  them, whether it exists or not;
- only regular files (never a device, FIFO, socket or ``/proc`` entry), their sizes checked before a byte is read;
- a ``.tar.gz`` unpacked member by member into a fresh folder, with caps on its members and bytes and a deadline;
  an archive that is refused leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Optional

from serve.config import Settings
from serve.errors import BadRequest, PayloadTooLarge, ServeError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_MAX_BYTES = 1 << 20  # an adapter_config.json is a few hundred bytes
MAX_SRC_CHARS = 1024
MAX_ENTRIES = 256  # files and folders in an adapter folder, or members of its archive
COPY_CHUNK = 1 << 20


class RegisterTimeout(ServeError):
    """Registering an adapter took longer than its deadline; nothing of it was kept."""

    status = 504
    error_type = "timeout"


@dataclass(frozen=True)
class SourcePolicy:
    """The folders adapters may be read from (resolved), where archives are unpacked, and the caps."""

    roots: tuple[Path, ...]
    unpack_root: Path
    max_bytes: int
    max_entries: int = MAX_ENTRIES

    @classmethod
    def from_settings(cls, settings: Settings) -> "SourcePolicy":
        folders = [settings.model_dir, settings.cache_dir, *settings.lora_adapter_roots]
        if settings.model_id and os.path.isdir(settings.model_id):  # a model served from a local folder
            folders.append(settings.model_id)
        roots = tuple(dict.fromkeys(_resolved(folder) for folder in folders))
        return cls(roots, Path(settings.cache_dir) / "adapters", settings.max_lora_adapter_bytes)

    def holds(self, path: Path) -> bool:
        return any(path == root or root in path.parents for root in self.roots)


@dataclass(frozen=True)
class Found:
    """The peft folder of an adapter, and the folder its register unpacked (removed with the adapter), if any."""

    folder: Path
    unpacked: Optional[Path] = None


def _resolved(folder: str) -> Path:
    return Path(os.path.realpath(os.path.expanduser(folder)))


def find_adapter(src: str, policy: SourcePolicy, deadline: float, label: str) -> Found:
    """The peft folder behind ``src``: the folder itself (or its one sub-folder holding the adapter), or a .tar.gz
    (given, or the only one in the folder) unpacked under ``policy.unpack_root`` in a folder named after ``label``."""
    path = inside_roots(src, policy)
    if path.is_dir():
        entries = _listing(path, policy, src)
        archives = sorted(entry for entry in entries if entry.name.endswith((".tar.gz", ".tgz")))
        if any(entry.name == CONFIG_FILE for entry in entries) or not archives:
            return Found(_find_config(path, entries, policy, src))
        if len(archives) != 1:
            raise BadRequest(f"src: {src} holds {len(archives)} .tar.gz archives; give the path of one", "src")
        path = archives[0]
    _regular(path, policy, policy.max_bytes, "MAX_LORA_ADAPTER_BYTES")
    target = unpack(path, policy, deadline, label)
    try:
        return Found(_find_config(target, _listing(target, policy, src), policy, src), target)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise


def inside_roots(src: str, policy: SourcePolicy) -> Path:
    """``src`` resolved, when it lies inside an allowed root; the same error for any path outside them."""
    if len(src) > MAX_SRC_CHARS or "\x00" in src:
        raise BadRequest(f"src: must be a path of at most {MAX_SRC_CHARS} characters", "src")
    if ".." in Path(src).parts:
        raise BadRequest("src: must not contain '..'", "src")
    path = _resolved(src)
    if not policy.holds(path):
        roots = ", ".join(str(root) for root in policy.roots)
        raise BadRequest(
            f"src: adapters are read only from inside {roots} (LORA_ADAPTER_ROOTS adds folders); {src} is not", "src"
        )
    try:
        path.stat()
    except FileNotFoundError:
        raise BadRequest(f"src: {src} does not exist", "src") from None
    except OSError as exc:
        raise BadRequest(f"src: {src} cannot be read: {exc.strerror}", "src") from None
    return path


def _listing(folder: Path, policy: SourcePolicy, src: str) -> list[Path]:
    """The entries of ``folder``, refusing a folder that holds more than the cap."""
    entries: list[Path] = []
    try:
        with os.scandir(folder) as found:
            for entry in found:
                entries.append(Path(entry.path))
                if len(entries) > policy.max_entries:
                    raise PayloadTooLarge(f"src: {src} holds more than {policy.max_entries} entries", "src")
    except OSError as exc:
        raise BadRequest(f"src: {src} cannot be listed: {exc.strerror}", "src") from None
    return entries


def _find_config(folder: Path, entries: list[Path], policy: SourcePolicy, src: str) -> Path:
    """The folder holding adapter_config.json, ``folder`` itself or its one sub-folder holding one, its files
    checked."""
    if folder / CONFIG_FILE not in entries:
        holders = [entry for entry in entries if entry.is_dir() and (entry / CONFIG_FILE).is_file()]
        if len(holders) != 1:
            raise BadRequest(f"src: {src} holds no {CONFIG_FILE} (adapter weights missing)", "src")
        folder = holders[0]
    _regular(folder / CONFIG_FILE, policy, CONFIG_MAX_BYTES, f"{CONFIG_MAX_BYTES} bytes")
    if not (folder / WEIGHTS_FILE).exists():
        raise BadRequest(f"src: {src} holds {CONFIG_FILE} but no {WEIGHTS_FILE}", "src")
    _regular(folder / WEIGHTS_FILE, policy, policy.max_bytes, "MAX_LORA_ADAPTER_BYTES")
    return folder


def _regular(path: Path, policy: SourcePolicy, limit: int, limit_name: str) -> None:
    """A regular file inside the roots (wherever its links point), of at most ``limit`` bytes."""
    resolved = _resolved(str(path))
    if not policy.holds(resolved):
        raise BadRequest(f"src: {path.name} links outside the folders adapters are read from", "src")
    try:
        found = resolved.stat()
    except OSError as exc:
        raise BadRequest(f"src: {path.name} cannot be read: {exc.strerror}", "src") from None
    if not stat.S_ISREG(found.st_mode):
        raise BadRequest(f"src: {path.name} is not a regular file", "src")
    if found.st_size > limit:
        raise PayloadTooLarge(f"src: {path.name} holds {found.st_size} bytes, more than {limit_name}", "src")


def unpack(archive: Path, policy: SourcePolicy, deadline: float, label: str) -> Path:
    """Unpack a .tar.gz into a fresh folder under ``policy.unpack_root``: plain files and folders only, at most
    ``max_entries`` members and ``max_bytes`` bytes; on any refusal the folder is removed."""
    policy.unpack_root.mkdir(parents=True, exist_ok=True)
    target = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=policy.unpack_root))
    try:
        with tarfile.open(archive, "r:*") as tar:
            _extract(tar, target, policy, deadline)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        shutil.rmtree(target, ignore_errors=True)
        raise BadRequest(f"src: {archive} cannot be unpacked safely: {exc}", "src") from None
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return target


def _extract(tar: tarfile.TarFile, target: Path, policy: SourcePolicy, deadline: float) -> None:
    """Extract member by member, stopping at the first one over a cap (before its bytes are unpacked)."""
    members = unpacked = 0
    for member in tar:
        members += 1
        if members > policy.max_entries:
            raise PayloadTooLarge(f"src: the archive holds more than {policy.max_entries} members", "src")
        if time.monotonic() > deadline:
            raise RegisterTimeout("src: unpacking the archive took longer than a register may take", "src")
        if not (member.isfile() or member.isdir()):
            raise tarfile.TarError(f"member {member.name!r} is a link or a special file (only files and folders)")
        checked = tarfile.data_filter(member, str(target))  # no absolute paths or '..'
        unpacked += member.size
        if unpacked > policy.max_bytes:
            limit = f"MAX_LORA_ADAPTER_BYTES={policy.max_bytes}"
            raise PayloadTooLarge(f"src: the archive unpacks to more than {limit} bytes", "src")
        path = target / checked.name
        if member.isdir():
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        source = tar.extractfile(member)
        if source is not None:
            _copy(source, path, deadline)


def _copy(source: IO[bytes], path: Path, deadline: float) -> None:
    with source, open(path, "wb") as out:
        while chunk := source.read(COPY_CHUNK):
            out.write(chunk)
            if time.monotonic() > deadline:
                raise RegisterTimeout("src: unpacking the archive took longer than a register may take", "src")
