"""Engine registry: atomic writes, a writer killed mid-write, concurrent writers, pruning,
lookup with fallback reasons, and deletion that never leaves the engine folder."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from seg_tsam.export.profiles import PRESETS, EngineCall, EngineProfile
from seg_tsam.export.registry import (
    REGISTRY_FILE_NAME,
    SCHEMA_NAME,
    EngineEntry,
    EngineKey,
    EngineQuery,
    EngineRegistry,
    FallbackReason,
    RegistryError,
    write_file_atomically,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
SD1 = PRESETS["SD1.x 512-768"]
TRT, CC = "10.13.2.6", "8.6"


def make_entry(registry: EngineRegistry, checkpoint: str = "ck1", *, profile: EngineProfile = SD1, trt: str = TRT,
               cc: str = CC, layers: str = "m0", precision: str = "fp16", extra: tuple[str, ...] = ()) -> EngineEntry:
    """An entry whose engine file exists in the registry folder."""
    key = EngineKey(checkpoint, profile, layers, trt, cc, precision)
    name = registry.engine_file_name(key, f"model {checkpoint}")
    registry.folder.mkdir(parents=True, exist_ok=True)
    (registry.folder / name).write_bytes(b"engine for " + checkpoint.encode())
    for extra_name in extra:
        (registry.folder / extra_name).write_bytes(b"extra")
    return EngineEntry(key, name, extra_files=extra, checkpoint_name=f"model {checkpoint}", family="sd1")


def query(checkpoint: str = "ck1", *, call: EngineCall | None = None, trt: str = TRT, cc: str = CC,
          layers: str | None = "m0", precision: str | None = None, names: tuple[str, ...] | None = None) -> EngineQuery:
    call = call or EngineCall.for_images(images=1, height=512, width=512)
    return EngineQuery(checkpoint, trt, cc, call, seg_layers=layers, precision=precision,
                       seg_layer_names=frozenset(names) if names is not None else None)


def leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.endswith((".tmp", ".deleted")))


# --- basics --------------------------------------------------------------------------------------------


def test_construction_touches_nothing(tmp_path):
    registry = EngineRegistry(tmp_path / "not-yet")
    assert registry.entries() == () and not registry.find(query()).found
    assert registry.prune_missing() == ()
    assert not (tmp_path / "not-yet").exists()


def test_add_round_trips_through_versioned_json(tmp_path):
    registry = EngineRegistry(tmp_path)
    entry = dataclasses.replace(make_entry(registry, extra=("weights_map.json",)), onnx_file="model ck1.onnx")
    assert registry.add(entry) is None
    payload = json.loads(registry.path.read_text())
    assert payload["schema"] == SCHEMA_NAME and payload["version"] == 1
    assert payload["engines"][0]["engine_file"] == entry.engine_file and payload["engines"][0]["id"] == entry.id
    assert payload["engines"][0]["onnx_file"] == "model ck1.onnx"
    assert "model ck1.onnx" not in entry.files  # the export is not the engine's to delete
    assert EngineRegistry(tmp_path).entries() == (entry,)
    assert registry.get(entry.id) == entry and registry.engine_path(entry) == tmp_path / entry.engine_file


def test_same_key_replaces_the_entry(tmp_path):
    registry = EngineRegistry(tmp_path)
    first = make_entry(registry)
    registry.add(first)
    rebuilt = make_entry(registry)
    assert rebuilt.id == first.id and rebuilt.engine_file == first.engine_file
    assert registry.add(rebuilt) == first
    assert len(registry.entries()) == 1


def test_add_refuses_missing_files_and_path_like_names(tmp_path):
    registry = EngineRegistry(tmp_path)
    key = EngineKey("ck1", SD1, "m0", TRT, CC)
    with pytest.raises(RegistryError, match="no such file"):
        registry.add(EngineEntry(key, "absent.plan"))
    for bad in ("../escape.plan", "sub/dir.plan", "/abs.plan", "..", "C:evil.plan", REGISTRY_FILE_NAME):
        with pytest.raises(RegistryError):
            EngineEntry(key, bad)
        with pytest.raises(RegistryError):
            EngineEntry(key, "fine.plan", onnx_file=bad)


def test_key_validation_names_the_field():
    with pytest.raises(RegistryError, match="precision: must be one of"):
        EngineKey("ck1", SD1, "m0", TRT, CC, precision="int4")
    with pytest.raises(RegistryError, match="checkpoint_hash: expected a non-empty string"):
        EngineKey("", SD1, "m0", TRT, CC)
    assert EngineKey("ck1", SD1, " M0 ", TRT, CC).seg_layers == "m0"


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"schema": "other", "version": 1, "engines": []}), "is not an engine registry"),
        (json.dumps({"schema": SCHEMA_NAME, "version": 99, "engines": []}), "newer version of this extension"),
        (json.dumps({"schema": SCHEMA_NAME, "version": 1, "engines": [{"engine_file": "x.plan"}]}),
         "engine #0: engine entry lacks field"),
    ],
)
def test_unreadable_registries_raise_clear_errors(tmp_path, content, message):
    (tmp_path / REGISTRY_FILE_NAME).write_text(content)
    with pytest.raises(RegistryError, match=message):
        EngineRegistry(tmp_path).entries()


def test_atomic_write_leaves_old_content_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "file.json"
    target.write_text("old")

    def failing_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_file_atomically(target, b"new content")
    assert target.read_text() == "old" and leftovers(tmp_path) == []


# --- processes killed mid-write, and concurrent writers ---------------------------------------------


CHILD_PRELUDE = textwrap.dedent(f"""
    import importlib.util, os, sys, time
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("seg_tsam_loader", {str(REPO_ROOT / "extension" / "loader.py")!r})
    loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loader)
    loader.register_package(Path({str(REPO_ROOT)!r}))
    from seg_tsam.export.profiles import PRESETS
    from seg_tsam.export.registry import EngineEntry, EngineKey, EngineRegistry

    registry = EngineRegistry(Path(sys.argv[1]), lock_timeout=30)

    def add(tag):
        key = EngineKey(tag, PRESETS["SD1.x 512-768"], "m0", "10.13.2.6", "8.6")
        name = registry.engine_file_name(key, tag)
        registry.folder.mkdir(parents=True, exist_ok=True)
        (registry.folder / name).write_bytes(b"engine")
        registry.add(EngineEntry(key, name, checkpoint_name=tag))
""")


def run_child(body: str, *args: str) -> subprocess.Popen:
    script = CHILD_PRELUDE + textwrap.dedent(body)
    return subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


needs_sigkill = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="SIGKILL is POSIX-only")


@needs_sigkill
def test_writer_killed_mid_write_leaves_the_last_complete_state(tmp_path):
    """The child adds 3 entries, then is SIGKILLed inside the 4th write (after the temporary file
    is written, before it replaces the registry), while holding the lock."""
    child = run_child("""
        for index in range(3):
            add(f"ck{index}")
            print("done", index, flush=True)
        def stuck_fsync(fd):
            print("writing", flush=True)
            time.sleep(120)
        os.fsync = stuck_fsync
        add("ck3")
        print("finished", flush=True)
    """, str(tmp_path))
    try:
        lines = []
        while not lines or lines[-1] != "writing":
            line = child.stdout.readline()
            assert line, f"child ended early: {child.stderr.read()}"
            lines.append(line.strip())
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
    assert lines == ["done 0", "done 1", "done 2", "writing"]
    registry = EngineRegistry(tmp_path, lock_timeout=5)
    assert [entry.key.checkpoint_hash for entry in registry.entries()] == ["ck0", "ck1", "ck2"]
    stale = leftovers(tmp_path)
    assert len(stale) == 1  # the dead writer's complete-but-unrenamed temporary file
    assert len(json.loads((tmp_path / stale[0]).read_text())["engines"]) == 4

    # The OS released the dead process's lock: the next writer gets it, and cleans up.
    started = time.monotonic()
    registry.add(make_entry(registry, "parent"))
    assert time.monotonic() - started < 5
    assert [entry.key.checkpoint_hash for entry in registry.entries()] == ["ck0", "ck1", "ck2", "parent"]
    assert leftovers(tmp_path) == []


@needs_sigkill
def test_writers_killed_at_random_moments_never_corrupt_the_file(tmp_path):
    registry = EngineRegistry(tmp_path)
    for round_index, delay in enumerate((0.05, 0.17, 0.31)):
        child = run_child("""
            start = len(registry.entries())
            for index in range(start, start + 10_000):
                add(f"ck{index}")
                print(index + 1, flush=True)
        """, str(tmp_path))
        try:
            first = child.stdout.readline()
            assert first, child.stderr.read()
            time.sleep(delay)
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=10)
        finally:
            if child.poll() is None:
                child.kill()
        printed = [int(line) for line in [first, *child.stdout.read().split()] if str(line).strip()]
        count = len(registry.entries())  # parses: never a torn file
        assert printed[-1] <= count <= printed[-1] + 1, (round_index, printed[-1], count)
        hashes = [entry.key.checkpoint_hash for entry in registry.entries()]
        assert hashes == [f"ck{index}" for index in range(count)]


def test_concurrent_writers_lose_no_update(tmp_path):
    writers, per_writer = 4, 12
    go = tmp_path / "go"
    children = [
        run_child(f"""
            while not os.path.exists({str(go)!r}):
                time.sleep(0.005)
            for index in range({per_writer}):
                add(f"w{writer}-{{index}}")
        """, str(tmp_path / "engines"))
        for writer in range(writers)
    ]
    time.sleep(0.5)  # let every child reach the start line
    go.touch()
    for child in children:
        _, stderr = child.communicate(timeout=60)
        assert child.returncode == 0, stderr
    registry = EngineRegistry(tmp_path / "engines")
    hashes = {entry.key.checkpoint_hash for entry in registry.entries()}
    assert hashes == {f"w{writer}-{index}" for writer in range(writers) for index in range(per_writer)}
    assert leftovers(tmp_path / "engines") == []


# --- pruning ------------------------------------------------------------------------------------------


def test_prune_keeps_exactly_the_entries_whose_files_exist(tmp_path):
    registry = EngineRegistry(tmp_path)
    same_model = [make_entry(registry, "ck1", profile=profile) for profile in PRESETS.values()]
    other = make_entry(registry, "ck2")
    for entry in [*same_model, other]:
        registry.add(entry)
    (tmp_path / same_model[0].engine_file).unlink()  # one of the two engines of ck1
    (tmp_path / other.engine_file).unlink()
    assert set(registry.prune_missing()) == {same_model[0], other}
    assert registry.entries() == (same_model[1],)
    assert registry.prune_missing() == ()


# --- lookup -------------------------------------------------------------------------------------------


def test_lookup_finds_a_covering_engine(tmp_path):
    registry = EngineRegistry(tmp_path)
    entry = make_entry(registry)
    registry.add(entry)
    result = registry.find(query(call=EngineCall.for_images(images=2, height=768, width=640, prompt_chunks=3)))
    assert result.found and result.entry == entry and result.reason is None
    assert registry.find(query(layers=None)).entry == entry  # SEG off: any exported layer set


def test_lookup_prefers_the_engine_tuned_closest_to_the_request(tmp_path):
    registry = EngineRegistry(tmp_path)
    wide = make_entry(registry, profile=SD1)
    static_768 = make_entry(registry, profile=EngineProfile(images=(1, 1, 4), height=768, width=768,
                                                            prompt_chunks=(1, 1, 3)))
    registry.add(wide)
    registry.add(static_768)
    assert registry.find(query(call=EngineCall.for_images(1, 768, 768))).entry == static_768
    assert registry.find(query(call=EngineCall.for_images(1, 512, 512))).entry == wide


@pytest.mark.parametrize(
    "changes, reason, words",
    [
        (dict(checkpoint="other"), FallbackReason.NO_ENGINE_FOR_CHECKPOINT,
         "no engine was exported for this checkpoint"),
        (dict(trt="10.8.0.43"), FallbackReason.TRT_VERSION_MISMATCH,
         "built with TensorRT 10.13.2.6, this is 10.8.0.43"),
        (dict(cc="8.9"), FallbackReason.COMPUTE_CAPABILITY_MISMATCH, "compute capability 8.6, this GPU is 8.9"),
        (dict(layers="m0,u1"), FallbackReason.SEG_LAYERS_MISMATCH, "SEG layers 'm0'"),
        (dict(precision="fp32"), FallbackReason.PRECISION_MISMATCH, "engine is fp16"),
        (dict(call=EngineCall.for_images(1, 1024, 512)), FallbackReason.SIZE_OUT_OF_RANGE, "height 1024 px"),
        (dict(call=EngineCall.for_images(1, 512, 512, prompt_chunks=4)), FallbackReason.TOKEN_COUNT_OUT_OF_RANGE,
         "308 tokens"),
        (dict(call=EngineCall.for_images(5, 512, 512)), FallbackReason.BATCH_OUT_OF_RANGE, "15 batch rows"),
    ],
)
def test_lookup_fallback_reasons(tmp_path, changes, reason, words):
    registry = EngineRegistry(tmp_path)
    registry.add(make_entry(registry))
    result = registry.find(query(**changes))
    assert not result.found and result.reason is reason
    assert words in result.message and result.message.startswith("TensorRT engine not used")


MID_NAMES = ("mid_block.attentions.0.transformer_blocks.0.attn1", "mid_block.attentions.0.transformer_blocks.1.attn1")


def test_layer_names_round_trip_and_match_whatever_the_spec_spelling(tmp_path):
    registry = EngineRegistry(tmp_path)
    named = dataclasses.replace(make_entry(registry, layers="mid"), seg_layer_names=MID_NAMES[::-1])
    registry.add(named)
    assert EngineRegistry(tmp_path).entries() == (named,) and named.seg_layer_names == MID_NAMES
    # "m0" and "mid" name the same layers: the names decide, not the spec strings
    assert registry.find(query(layers="m0", names=MID_NAMES)).found
    other = registry.find(query(layers="mid", names=MID_NAMES[:1]))
    assert other.reason is FallbackReason.SEG_LAYERS_MISMATCH and "SEG layers 'mid'" in other.message
    assert registry.find(query(layers=None)).found  # SEG off: any layer set


def test_entries_without_layer_names_match_by_spec(tmp_path):
    registry = EngineRegistry(tmp_path)
    registry.add(make_entry(registry, layers="mid"))  # registered before names were recorded
    assert registry.find(query(layers="MID", names=MID_NAMES)).found
    assert registry.find(query(layers="m0", names=MID_NAMES)).reason is \
        FallbackReason.SEG_LAYERS_MISMATCH


def test_lookup_reports_the_engine_that_came_closest(tmp_path):
    registry = EngineRegistry(tmp_path)
    old_trt = make_entry(registry, trt="10.0.1.6", profile=EngineProfile(images=1, height=1024, width=1024))
    too_small = make_entry(registry)
    registry.add(old_trt)
    registry.add(too_small)
    result = registry.find(query(call=EngineCall.for_images(1, 1024, 1024)))
    assert result.reason is FallbackReason.SIZE_OUT_OF_RANGE
    assert {rejection.reason for rejection in result.rejections} == {
        FallbackReason.TRT_VERSION_MISMATCH, FallbackReason.SIZE_OUT_OF_RANGE
    }
    assert "1 other engine(s) did not fit either" in result.message


def test_lookup_skips_engines_whose_file_is_gone(tmp_path):
    registry = EngineRegistry(tmp_path)
    entry = make_entry(registry)
    registry.add(entry)
    (tmp_path / entry.engine_file).unlink()
    result = registry.find(query())
    assert result.reason is FallbackReason.ENGINE_FILE_MISSING and "export it again" in result.message


# --- deletion ---------------------------------------------------------------------------------------


def test_delete_removes_entry_and_files(tmp_path):
    registry = EngineRegistry(tmp_path)
    keep, gone = make_entry(registry, "ck1"), make_entry(registry, "ck2", extra=("ck2.weights.json",))
    registry.add(keep)
    registry.add(gone)
    assert registry.delete(gone.id) == gone
    assert registry.entries() == (keep,)
    assert not (tmp_path / gone.engine_file).exists() and not (tmp_path / "ck2.weights.json").exists()
    assert (tmp_path / keep.engine_file).exists() and leftovers(tmp_path) == []
    with pytest.raises(RegistryError, match="no engine with id"):
        registry.delete(gone.id)


@pytest.mark.parametrize("request_value", ["../engines.json", "/etc/passwd", "model.plan", "", None, "0123"])
def test_delete_takes_ids_never_paths(tmp_path, request_value):
    registry = EngineRegistry(tmp_path)
    entry = make_entry(registry)
    registry.add(entry)
    with pytest.raises(RegistryError, match="not an engine id"):
        registry.delete(request_value)
    assert registry.entries() == (entry,) and (tmp_path / entry.engine_file).exists()


def test_a_tampered_registry_cannot_point_delete_outside_the_folder(tmp_path):
    folder, victim = tmp_path / "engines", tmp_path / "victim.plan"
    folder.mkdir()
    victim.write_text("precious")
    registry = EngineRegistry(folder)
    entry = make_entry(registry)
    registry.add(entry)
    payload = json.loads(registry.path.read_text())
    payload["engines"][0]["engine_file"] = "../victim.plan"
    registry.path.write_text(json.dumps(payload))
    with pytest.raises(RegistryError, match="plain file name"):
        registry.delete(entry.id)
    assert victim.read_text() == "precious"


@pytest.mark.skipif(not hasattr(os, "symlink") or os.name != "posix", reason="needs POSIX symlinks")
def test_a_symlink_out_of_the_folder_is_never_followed(tmp_path):
    folder, victim = tmp_path / "engines", tmp_path / "victim.plan"
    folder.mkdir()
    victim.write_text("precious")
    registry = EngineRegistry(folder)
    entry = make_entry(registry)
    registry.add(entry)
    (folder / entry.engine_file).unlink()
    (folder / entry.engine_file).symlink_to(victim)
    assert registry.find(query()).reason is FallbackReason.ENGINE_FILE_MISSING
    with pytest.raises(RegistryError, match="resolves outside the engine folder"):
        registry.delete(entry.id)
    assert victim.read_text() == "precious" and registry.entries() == (entry,)
    assert registry.prune_missing() == (entry,) and victim.exists()


def test_delete_crash_leftovers_are_cleaned_by_the_next_writer(tmp_path):
    """A tombstone left by a deleter that died before unlinking is removed on the next write."""
    registry = EngineRegistry(tmp_path)
    entry = make_entry(registry)
    registry.add(entry)
    (tmp_path / f".{entry.engine_file}.{entry.id}.deleted").write_bytes(b"old engine")
    registry.add(make_entry(registry, "ck2"))
    assert leftovers(tmp_path) == []
