"""The engine registry: which TensorRT engines exist, what each was built for, and which one fits.

One JSON file, ``engines.json``, in the engine folder the caller names (nothing here knows the
WebUI's paths). Its layout is ``{"schema": …, "version": 1, "engines": [entry, …]}``; an entry
is keyed by checkpoint hash, profile, SEG layers, TensorRT version, GPU compute capability and
precision, and names its files *relative to the folder* (plain file names only).

Durability and concurrency:

- Every change is a read-modify-write under an inter-process lock (``engines.json.lock``,
  an OS file lock through :mod:`filelock`, which torch already depends on; the OS releases it
  when a process dies), so two WebUI processes or an API call beside the UI lose no update.
- The file is replaced atomically: written to a temporary file in the same folder, flushed,
  fsync'ed, then ``os.replace``'d over the old one (and the folder fsync'ed on POSIX). A process
  killed at any point leaves either the old or the new file, never a torn one; its temporary
  file is removed by the next writer (any temporary file seen under the lock is stale).
- Deleting an engine takes only an entry id, never a path: the files are resolved inside the
  folder, renamed to tombstones, the entry is removed, then the tombstones are unlinked. A crash
  in between leaves either an entry whose file is missing (lookups skip it, :meth:`prune_missing`
  drops it) or a tombstone (removed by the next writer), never an entry pointing at a wrong file.

Nothing happens at import or construction: no folder is created, no file read, no GPU queried.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import filelock

from .profiles import PRECISIONS, EngineCall, EngineProfile, ProfileError

SCHEMA_NAME = "seg_tsam.engine_registry"
SCHEMA_VERSION = 1
REGISTRY_FILE_NAME = "engines.json"
ENGINE_SUFFIX = ".plan"

_TEMP_SUFFIX = ".tmp"
_TOMBSTONE_SUFFIX = ".deleted"
_SLUG_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class RegistryError(RuntimeError):
    """The registry file is unreadable, from a newer version, locked too long, or a request is invalid."""


# --- atomic file writes ---------------------------------------------------------------------------


def _fsync_directory(directory: Path) -> None:
    """Make a rename durable (POSIX only; Windows cannot open a directory for fsync)."""
    if os.name != "posix":
        return
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def write_file_atomically(path: Path | str, data: bytes | bytearray | memoryview | Any) -> None:
    """Replace ``path`` with ``data`` (anything with the buffer protocol) so that readers and a
    crash see either the old or the new content, never a partial file."""
    path = Path(path)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise
    _fsync_directory(path.parent)


# --- entries ----------------------------------------------------------------------------------------


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def normalize_layers(layers: str) -> str:
    """The stored form of a SEG layer spec: lower case, no spaces.

    It does not know any model's layer counts, so "mid" and "m0" stay different specs; lookups
    compare the resolved layers (``EngineEntry.seg_layer_names``) where the entry has them.
    """
    return layers.replace(" ", "").lower()


def check_file_name(name: Any) -> str:
    """``name`` if it is a plain file name (no folder part, no ``..``), else :class:`RegistryError`."""
    if not isinstance(name, str) or not name or name in (".", ".."):
        raise RegistryError(f"engine file name must be a plain file name, got {name!r}")
    if "/" in name or "\\" in name or ":" in name or "\0" in name or Path(name).name != name:
        raise RegistryError(f"engine file name must be a plain file name inside the engine folder, got {name!r}")
    if name.endswith((_TEMP_SUFFIX, _TOMBSTONE_SUFFIX)) or name in (REGISTRY_FILE_NAME, REGISTRY_FILE_NAME + ".lock"):
        raise RegistryError(f"{name!r} is reserved for the registry's own files")
    return name


@dataclass(frozen=True)
class EngineKey:
    """What an engine was built for; two builds with the same key are interchangeable."""

    checkpoint_hash: str
    profile: EngineProfile
    seg_layers: str
    trt_version: str
    compute_capability: str  #: "major.minor", e.g. "8.6"
    precision: str = "fp16"

    def __post_init__(self) -> None:
        for name in ("checkpoint_hash", "seg_layers", "trt_version", "compute_capability"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise RegistryError(f"{name}: expected a non-empty string, got {value!r}")
        if not isinstance(self.profile, EngineProfile):
            raise RegistryError(f"profile: expected an EngineProfile, got {type(self.profile).__name__}")
        if self.precision not in PRECISIONS:
            raise RegistryError(f"precision: must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        object.__setattr__(self, "seg_layers", normalize_layers(self.seg_layers))

    @property
    def engine_id(self) -> str:
        """A stable id derived from the key (a rebuild for the same key gets the same id)."""
        canonical = json.dumps(
            [self.checkpoint_hash, self.profile.to_dict(), self.seg_layers, self.trt_version,
             self.compute_capability, self.precision],
            sort_keys=True,
        )
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class EngineEntry:
    """One registered engine: its key, its files (names inside the folder) and labels for the UI."""

    key: EngineKey
    engine_file: str
    extra_files: tuple[str, ...] = ()
    checkpoint_name: str = ""
    family: str = ""
    preset: str | None = None
    refittable: bool = False
    created: str = field(default_factory=_utc_now)
    #: Module paths of the self-attention layers the engine blurs: SEG layer specs spelt
    #: differently ("mid", "m0") match by these. Empty for engines registered without them.
    seg_layer_names: tuple[str, ...] = ()
    #: The ONNX export (file name in the exports folder) the engine was built from: a refit may
    #: need its graph constants. Not one of :attr:`files`: deleting the engine keeps the export.
    onnx_file: str | None = None

    def __post_init__(self) -> None:
        check_file_name(self.engine_file)
        if self.onnx_file is not None:
            check_file_name(self.onnx_file)
        object.__setattr__(self, "extra_files", tuple(check_file_name(name) for name in self.extra_files))
        object.__setattr__(self, "seg_layer_names", tuple(sorted(self.seg_layer_names)))

    @property
    def id(self) -> str:
        return self.key.engine_id

    @property
    def files(self) -> tuple[str, ...]:
        return (self.engine_file, *self.extra_files)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "checkpoint_hash": self.key.checkpoint_hash,
            "checkpoint_name": self.checkpoint_name,
            "family": self.family,
            "profile": self.key.profile.to_dict(),
            "preset": self.preset,
            "seg_layers": self.key.seg_layers,
            "seg_layer_names": list(self.seg_layer_names),
            "precision": self.key.precision,
            "trt_version": self.key.trt_version,
            "compute_capability": self.key.compute_capability,
            "refittable": self.refittable,
            "engine_file": self.engine_file,
            "extra_files": list(self.extra_files),
            "onnx_file": self.onnx_file,
            "created": self.created,
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> EngineEntry:
        """Inverse of :meth:`to_dict`; raises :class:`RegistryError` naming the bad field."""
        try:
            key = EngineKey(
                checkpoint_hash=values["checkpoint_hash"],
                profile=EngineProfile.from_dict(values["profile"]),
                seg_layers=values["seg_layers"],
                trt_version=values["trt_version"],
                compute_capability=values["compute_capability"],
                precision=values.get("precision", "fp16"),
            )
            return cls(
                key=key,
                engine_file=values["engine_file"],
                extra_files=tuple(_string_list("extra_files", values.get("extra_files", []))),
                checkpoint_name=str(values.get("checkpoint_name", "")),
                family=str(values.get("family", "")),
                preset=_optional_string("preset", values.get("preset")),
                refittable=bool(values.get("refittable", False)),
                created=str(values.get("created", "")),
                seg_layer_names=tuple(_string_list("seg_layer_names", values.get("seg_layer_names", []))),
                onnx_file=_optional_string("onnx_file", values.get("onnx_file")),
            )
        except KeyError as missing:
            raise RegistryError(f"engine entry lacks field {missing.args[0]!r}") from None
        except ProfileError as error:
            raise RegistryError(f"engine entry profile: {error}") from None


def _string_list(name: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise RegistryError(f"{name}: expected a list of names, got {value!r}")
    return value


def _optional_string(name: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise RegistryError(f"{name}: expected a string or null, got {value!r}")
    return value


# --- lookup -------------------------------------------------------------------------------------------


class FallbackReason(str, Enum):
    """Why no engine was used, from the least to the most specific (later = got further)."""

    NO_ENGINE_FOR_CHECKPOINT = "no_engine_for_checkpoint"
    ENGINE_FILE_MISSING = "engine_file_missing"
    SEG_LAYERS_MISMATCH = "seg_layers_mismatch"
    TRT_VERSION_MISMATCH = "trt_version_mismatch"
    COMPUTE_CAPABILITY_MISMATCH = "compute_capability_mismatch"
    PRECISION_MISMATCH = "precision_mismatch"
    BATCH_OUT_OF_RANGE = "batch_out_of_range"
    TOKEN_COUNT_OUT_OF_RANGE = "token_count_out_of_range"
    SIZE_OUT_OF_RANGE = "size_out_of_range"


_REASON_RANK = {reason: rank for rank, reason in enumerate(FallbackReason)}
_AXIS_REASON = {
    "batch": FallbackReason.BATCH_OUT_OF_RANGE,
    "tokens": FallbackReason.TOKEN_COUNT_OUT_OF_RANGE,
    "height": FallbackReason.SIZE_OUT_OF_RANGE,
    "width": FallbackReason.SIZE_OUT_OF_RANGE,
}


@dataclass(frozen=True)
class EngineQuery:
    """What the runtime needs: an engine for this checkpoint, this TensorRT/GPU and this call."""

    checkpoint_hash: str
    trt_version: str
    compute_capability: str
    call: EngineCall
    seg_layers: str | None = None  #: None: SEG is off for this call, any exported layer set will do
    precision: str | None = None  #: None: any precision
    #: The blurred layers' module paths, when known: compared with an entry's ``seg_layer_names``
    #: (the spec strings are compared only for entries registered without names).
    seg_layer_names: frozenset[str] | None = None


def _layers_mismatch(entry: EngineEntry, query: EngineQuery) -> str | None:
    """Why ``entry`` blurs other layers than ``query`` wants, or ``None`` (also when SEG is off)."""
    if query.seg_layers is None:
        return None
    if entry.seg_layer_names and query.seg_layer_names is not None:
        same = frozenset(entry.seg_layer_names) == query.seg_layer_names
    else:
        same = entry.key.seg_layers == normalize_layers(query.seg_layers)
    if same:
        return None
    return (f"engine was exported with SEG layers {entry.key.seg_layers!r}, "
            f"this generation uses {normalize_layers(query.seg_layers)!r}")


@dataclass(frozen=True)
class Rejection:
    engine_id: str | None
    reason: FallbackReason
    message: str


@dataclass(frozen=True)
class LookupResult:
    """The chosen engine, or why none fits (``rejections``, one per engine and failed check)."""

    entry: EngineEntry | None
    rejections: tuple[Rejection, ...] = ()

    @property
    def found(self) -> bool:
        return self.entry is not None

    @property
    def primary(self) -> Rejection | None:
        """The rejection of the engine that came closest (the most specific reason)."""
        if self.entry is not None or not self.rejections:
            return None
        return max(self.rejections, key=lambda rejection: _REASON_RANK[rejection.reason])

    @property
    def reason(self) -> FallbackReason | None:
        primary = self.primary
        return primary.reason if primary else None

    @property
    def message(self) -> str:
        """A sentence for the UI ("TensorRT engine not used: …")."""
        if self.entry is not None:
            return f"using TensorRT engine {self.entry.engine_file}"
        primary = self.primary
        if primary is None:
            return "TensorRT engine not used: no engines are registered"
        others = len({rejection.engine_id for rejection in self.rejections} - {primary.engine_id})
        tail = f" ({others} other engine(s) did not fit either)" if others else ""
        return f"TensorRT engine not used, running PyTorch: {primary.message}{tail}"


def _preference(entry: EngineEntry, call: EngineCall) -> tuple[float, int]:
    """Sort key among engines that fit: closest ``opt`` first (TensorRT tuned its kernels
    there), then the narrowest profile."""
    profile = entry.key.profile
    axes = (
        (call.rows, profile.batch_rows), (call.latent_height, profile.latent_height),
        (call.latent_width, profile.latent_width), (call.tokens, profile.tokens),
    )
    distance = sum(abs(value - axis.opt) / axis.opt for value, axis in axes)
    span = 1
    for _, axis in axes:
        span *= axis.max - axis.min + 1
    return distance, span


def find_engine(
    entries: tuple[EngineEntry, ...], query: EngineQuery, file_exists: Callable[[EngineEntry], bool]
) -> LookupResult:
    """The best entry for ``query`` among ``entries``, with every rejection explained."""
    candidates = [entry for entry in entries if entry.key.checkpoint_hash == query.checkpoint_hash]
    if not candidates:
        return LookupResult(None, (Rejection(
            None, FallbackReason.NO_ENGINE_FOR_CHECKPOINT,
            f"no engine was exported for this checkpoint (hash {query.checkpoint_hash})",
        ),))
    rejections: list[Rejection] = []
    fitting: list[EngineEntry] = []
    for entry in candidates:
        key = entry.key
        if not file_exists(entry):
            rejections.append(Rejection(entry.id, FallbackReason.ENGINE_FILE_MISSING,
                                        f"engine file {entry.engine_file} is missing; export it again"))
        elif (layers_mismatch := _layers_mismatch(entry, query)) is not None:
            rejections.append(Rejection(entry.id, FallbackReason.SEG_LAYERS_MISMATCH, layers_mismatch))
        elif key.trt_version != query.trt_version:
            rejections.append(Rejection(entry.id, FallbackReason.TRT_VERSION_MISMATCH,
                                        f"engine was built with TensorRT {key.trt_version}, this is "
                                        f"{query.trt_version}; rebuild it"))
        elif key.compute_capability != query.compute_capability:
            rejections.append(Rejection(entry.id, FallbackReason.COMPUTE_CAPABILITY_MISMATCH,
                                        f"engine was built for a GPU of compute capability "
                                        f"{key.compute_capability}, this GPU is {query.compute_capability}"))
        elif query.precision is not None and key.precision != query.precision:
            rejections.append(Rejection(entry.id, FallbackReason.PRECISION_MISMATCH,
                                        f"engine is {key.precision}, {query.precision} was requested"))
        else:
            mismatches = key.profile.mismatches(query.call)
            rejections.extend(Rejection(entry.id, _AXIS_REASON[mismatch.axis], mismatch.message)
                              for mismatch in mismatches)
            if not mismatches:
                fitting.append(entry)
    if fitting:
        return LookupResult(min(fitting, key=lambda entry: _preference(entry, query.call)), tuple(rejections))
    return LookupResult(None, tuple(rejections))


# --- the registry ---------------------------------------------------------------------------------


def _slug(text: str, limit: int = 60) -> str:
    slug = _SLUG_UNSAFE.sub("_", text).strip("._-")
    return slug[:limit] or "unet"


class EngineRegistry:
    """The registry of the engines in ``folder`` (created on the first write, not before)."""

    def __init__(self, folder: Path | str, *, lock_timeout: float = 60.0):
        self.folder = Path(folder)
        self.lock_timeout = lock_timeout

    @property
    def path(self) -> Path:
        return self.folder / REGISTRY_FILE_NAME

    # --- reading ----------------------------------------------------------------------------

    def entries(self) -> tuple[EngineEntry, ...]:
        """All entries, as last written completely (no lock needed: the file is replaced atomically)."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return ()
        return self._parse(text)

    def get(self, engine_id: str) -> EngineEntry | None:
        return next((entry for entry in self.entries() if entry.id == engine_id), None)

    def engine_path(self, entry: EngineEntry) -> Path:
        """Absolute path of ``entry``'s engine file (inside the folder by construction)."""
        return self._inside_folder(entry.engine_file)

    def engine_file_name(self, key: EngineKey, checkpoint_name: str = "") -> str:
        """The file name a new engine for ``key`` gets: readable prefix + id, so a rebuild
        for the same key overwrites the same file."""
        return f"{_slug(checkpoint_name)}-{key.engine_id}{ENGINE_SUFFIX}"

    def find(self, query: EngineQuery) -> LookupResult:
        """The best engine for ``query``, or the reasons none fits (for a visible message)."""
        return find_engine(self.entries(), query, lambda entry: self._file_present(entry.engine_file))

    # --- writing ------------------------------------------------------------------------------

    def add(self, entry: EngineEntry) -> EngineEntry | None:
        """Register ``entry`` (its engine file must already be in the folder). An entry with the
        same key is replaced and returned; its files are left alone (the usual rebuild writes the
        same file name, see :meth:`engine_file_name`)."""
        for name in entry.files:
            if not self._file_present(name):
                raise RegistryError(f"cannot register {name}: no such file in {self.folder}")
        replaced: list[EngineEntry] = []

        def update(entries: list[EngineEntry]) -> list[EngineEntry]:
            replaced.extend(existing for existing in entries if existing.id == entry.id)
            return [existing for existing in entries if existing.id != entry.id] + [entry]

        self._modify(update)
        return replaced[0] if replaced else None

    def prune_missing(self) -> tuple[EngineEntry, ...]:
        """Drop every entry whose engine file is gone; return the dropped entries."""
        dropped: list[EngineEntry] = []

        def update(entries: list[EngineEntry]) -> list[EngineEntry]:
            kept = []
            for entry in entries:
                (kept if self._file_present(entry.engine_file) else dropped).append(entry)
            return kept

        if self.path.exists():
            self._modify(update)
        return tuple(dropped)

    def delete(self, engine_id: str) -> EngineEntry:
        """Delete the engine ``engine_id`` (entry and files). Only ids are accepted, never paths;
        files are resolved inside the folder and must not lead outside it (e.g. via a symlink)."""
        if not isinstance(engine_id, str) or not re.fullmatch(r"[0-9a-f]{16}", engine_id):
            raise RegistryError(f"not an engine id: {engine_id!r}")
        with self._locked():
            entries = list(self.entries())
            entry = next((candidate for candidate in entries if candidate.id == engine_id), None)
            if entry is None:
                raise RegistryError(f"no engine with id {engine_id} in {self.folder}")
            paths = [self._inside_folder(name) for name in entry.files]  # raises for a path that escapes
            present = [path for path in paths if path.is_file()]
            tombstones = []
            try:
                for path in present:
                    tombstone = path.with_name(f".{path.name}.{engine_id}{_TOMBSTONE_SUFFIX}")
                    os.replace(path, tombstone)
                    tombstones.append((tombstone, path))
            except OSError as error:
                for tombstone, path in reversed(tombstones):  # put back what was moved
                    os.replace(tombstone, path)
                raise RegistryError(f"cannot delete {entry.engine_file} (in use?): {error}") from error
            self._write([candidate for candidate in entries if candidate.id != engine_id])
            for tombstone, _ in tombstones:
                tombstone.unlink()
        return entry

    # --- internals ------------------------------------------------------------------------------

    def _parse(self, text: str) -> tuple[EngineEntry, ...]:
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as error:
            raise RegistryError(f"{self.path} is not valid JSON ({error}); fix or delete it") from None
        if not isinstance(payload, dict) or payload.get("schema") != SCHEMA_NAME:
            raise RegistryError(f"{self.path} is not an engine registry (schema {SCHEMA_NAME!r} expected)")
        version = payload.get("version")
        if not isinstance(version, int) or version < 1:
            raise RegistryError(f"{self.path}: bad schema version {version!r}")
        if version > SCHEMA_VERSION:
            raise RegistryError(
                f"{self.path} was written by a newer version of this extension (schema {version}, "
                f"this one reads up to {SCHEMA_VERSION}); update the extension"
            )
        raw_entries = payload.get("engines")
        if not isinstance(raw_entries, list):
            raise RegistryError(f"{self.path}: 'engines' must be a list")
        parsed = []
        for index, raw in enumerate(raw_entries):
            if not isinstance(raw, dict):
                raise RegistryError(f"{self.path}: engine #{index} is not an object")
            try:
                parsed.append(EngineEntry.from_dict(raw))
            except RegistryError as error:
                raise RegistryError(f"{self.path}: engine #{index}: {error}") from None
        return tuple(parsed)

    def _write(self, entries: list[EngineEntry]) -> None:
        payload = {"schema": SCHEMA_NAME, "version": SCHEMA_VERSION, "engines": [entry.to_dict() for entry in entries]}
        text = json.dumps(payload, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
        write_file_atomically(self.path, text.encode("utf-8"))

    def _modify(self, update: Callable[[list[EngineEntry]], list[EngineEntry]]) -> None:
        """Read the latest state, apply ``update``, write it back, all under the lock."""
        with self._locked():
            self._write(update(list(self.entries())))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(self.folder / (REGISTRY_FILE_NAME + ".lock")), timeout=self.lock_timeout)
        try:
            lock.acquire()
        except filelock.Timeout:
            raise RegistryError(
                f"the engine registry in {self.folder} stayed locked for {self.lock_timeout:g} s "
                "(another export still writing?)"
            ) from None
        try:
            self._remove_stale_files()
            yield
        finally:
            lock.release()

    def _remove_stale_files(self) -> None:
        """Temporary registry files and tombstones seen while holding the lock belong to a writer
        that died (live writers hold the lock while they exist)."""
        registry_temp = re.compile(rf"^\.{re.escape(REGISTRY_FILE_NAME)}\..*{re.escape(_TEMP_SUFFIX)}$")
        for path in self.folder.iterdir():
            if registry_temp.match(path.name) or path.name.endswith(_TOMBSTONE_SUFFIX):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def _inside_folder(self, name: str) -> Path:
        """``folder/name`` after checking that it resolves to a file directly inside the folder."""
        check_file_name(name)
        folder = Path(os.path.realpath(self.folder))
        path = Path(os.path.realpath(self.folder / name))
        if path.parent != folder:
            raise RegistryError(f"{name} resolves outside the engine folder ({path}); refusing to touch it")
        return self.folder / name

    def _file_present(self, name: str) -> bool:
        """Whether ``name`` is a regular file inside the folder (False for one that escapes it)."""
        try:
            return self._inside_folder(name).is_file()
        except RegistryError:
            return False
