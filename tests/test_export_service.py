"""The WebUI export service (``extension/webui/export_service.py``) without a running WebUI.

Request validation, derived names and engine listing/deletion are pure; the export itself runs
on a tiny ldm UNet from a WebUI checkout's ``repositories/`` when ``SEG_TSAM_WEBUI_ROOT`` is set
(the same import as ``test_onnx_export.py``), with TensorRT reported missing.
"""

from __future__ import annotations

import types

import pytest

from seg_tsam.extension.webui import export_service
from seg_tsam.export.profiles import PRESETS, EngineProfile
from seg_tsam.export.refit import refit_map_beside
from seg_tsam.export.registry import EngineEntry, EngineKey, EngineRegistry
from seg_tsam.export.onnx_exports import OnnxExportInfo, write_export_info
from seg_tsam.extension.webui.export_service import (
    EngineNotFound,
    ExportNotFound,
    ExportRequest,
    ExportRequestError,
    check_engine_id,
    checkpoint_facts,
    delete_engine,
    delete_export,
    engine_rows,
    export_current_checkpoint,
    export_rows,
    list_engines,
    list_exports,
    onnx_file_name,
)

SD1 = "SD1.x 512-768"
CUSTOM = {"images": [1, 1, 2], "height": [512, 512, 640], "width": 512}


# --- requests -------------------------------------------------------------------------------------


def test_default_request_is_the_sd1_preset():
    request = ExportRequest()
    assert request.preset == SD1 and request.engine_profile == PRESETS[SD1]
    assert (request.seg_layers, request.precision, request.build_engine) == ("mid", "fp16", True)


def test_custom_profile_is_parsed():
    request = ExportRequest(preset=None, profile=CUSTOM, precision="fp32")
    assert isinstance(request.profile, EngineProfile)
    assert request.engine_profile.height == (512, 512, 640)
    assert request.to_dict()["profile"]["width"] == [512, 512, 512]


@pytest.mark.parametrize("kwargs, message", [
    (dict(preset="SD3 huge"), "unknown preset"),
    (dict(preset=None), "choose a preset"),
    (dict(profile=CUSTOM), "not both"),
    (dict(preset=None, profile={"images": 1, "height": 500, "width": 512}), "custom profile: height"),
    (dict(preset=None, profile={"images": 1, "height": 512}), "custom profile: width"),
    (dict(precision="int8"), "precision"),
    (dict(seg_layers=""), "SEG layers: layers is empty"),
    (dict(seg_layers="../../etc/passwd"), "SEG layers: unknown layer '../../etc/passwd'"),
    (dict(seg_layers="m" * 65), "SEG layers: at most 64 characters"),
    (dict(seg_layers=3), "SEG layers: layers must be a string"),
    (dict(build_engine="yes"), "true or false"),
])
def test_bad_requests_are_refused_with_a_message(kwargs, message):
    with pytest.raises(ExportRequestError, match=message):
        ExportRequest(**kwargs)


def test_from_json():
    request = ExportRequest.from_json({"profile": CUSTOM, "seg_layers": "d2, m0", "build_engine": False})
    assert request.preset is None and request.seg_layers == "d2, m0" and not request.build_engine
    assert ExportRequest.from_json({}) == ExportRequest()
    with pytest.raises(ExportRequestError, match=r"unknown field\(s\) \['path'\]"):
        ExportRequest.from_json({"path": "/tmp/x.onnx"})
    with pytest.raises(ExportRequestError, match="JSON object"):
        ExportRequest.from_json(["SD1.x 512-768"])


# --- names ----------------------------------------------------------------------------------------


def test_onnx_file_names_are_derived_and_plain():
    assert onnx_file_name("a1b2c3d4e5", "mid", "fp16") == "a1b2c3d4e5_mid_fp16.onnx"
    assert onnx_file_name("a1b2c3d4e5", "D2, m0", "fp32") == "a1b2c3d4e5_d2-m0_fp32.onnx"
    assert "/" not in onnx_file_name("a/b", "x:y", "fp16")


@pytest.mark.parametrize("bad", ["../engines.json", "0123456789ABCDEF", "0123", None, 7, "0123456789abcdef/",
                                 "0123456789abcdef\n"])
def test_engine_ids_are_checked(bad):
    with pytest.raises(ExportRequestError, match="not an engine id"):
        check_engine_id(bad)


def _info(shorthash, name="tiny"):
    info = types.SimpleNamespace(shorthash=shorthash, name=name)
    info.calculate_shorthash = lambda: "f00dfeed00"
    return info


def test_checkpoint_facts():
    facts = checkpoint_facts(types.SimpleNamespace(sd_checkpoint_info=_info("abcdef0123"), is_sdxl=False, is_sd2=False))
    assert (facts.short_hash, facts.flavour, facts.family) == ("abcdef0123", "ldm", "sd1")
    sd2 = checkpoint_facts(types.SimpleNamespace(sd_checkpoint_info=_info(None), is_sd2=True))
    assert (sd2.family, sd2.short_hash) == ("sd2", "f00dfeed00")
    sdxl = checkpoint_facts(types.SimpleNamespace(sd_checkpoint_info=_info("1"), is_sdxl=True))
    assert (sdxl.flavour, sdxl.family) == ("sgm", "sdxl")
    with pytest.raises(export_service.ExportFailed, match="no checkpoint"):
        checkpoint_facts(None)


# --- engines: list and delete ---------------------------------------------------------------------


def _register(models_dir, checkpoint_hash="abcdef0123") -> EngineEntry:
    folder = export_service.engine_folder(models_dir)
    folder.mkdir(parents=True, exist_ok=True)
    registry = EngineRegistry(folder)
    key = EngineKey(checkpoint_hash, PRESETS[SD1], "mid", "10.9.0", "8.6")
    name = registry.engine_file_name(key, "tiny")
    (folder / name).write_bytes(b"plan")
    entry = EngineEntry(key=key, engine_file=name, checkpoint_name="tiny", family="sd1", preset=SD1)
    registry.add(entry)
    return entry


def test_list_and_delete_engines(tmp_path):
    assert list_engines(tmp_path) == []
    entry = _register(tmp_path)
    engines = list_engines(tmp_path)
    assert [engine["id"] for engine in engines] == [entry.id] and engines[0]["file_present"]
    rows = engine_rows(engines)
    assert rows[0][0] == entry.id and len(rows[0]) == len(export_service.ENGINE_COLUMNS)
    with pytest.raises(EngineNotFound):
        delete_engine(tmp_path, "0" * 16)
    with pytest.raises(ExportRequestError):
        delete_engine(tmp_path, "../" + entry.engine_file)
    assert delete_engine(tmp_path, entry.id)["id"] == entry.id
    assert list_engines(tmp_path) == []
    assert not (export_service.engine_folder(tmp_path) / entry.engine_file).exists()


def test_missing_engine_file_is_listed_as_missing(tmp_path):
    entry = _register(tmp_path)
    (export_service.engine_folder(tmp_path) / entry.engine_file).unlink()
    engines = list_engines(tmp_path)
    assert not engines[0]["file_present"] and engine_rows(engines)[0][-1].endswith("(missing)")


# --- ONNX exports: list and delete -------------------------------------------------------------------


def _write_export(models_dir, name: str, *, external: bool, refit_map: bool) -> list[str]:
    """A real (tiny) ONNX file as the export leaves it: model, info, optionally external data and
    refit map. Returns the file names written."""
    onnx = pytest.importorskip("onnx")
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    folder = export_service.onnx_folder(models_dir)
    folder.mkdir(parents=True, exist_ok=True)
    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight])
    data_name = f"{name}.0a1b2c3d.data"
    onnx.save_model(helper.make_model(graph), str(folder / name), save_as_external_data=external,
                    location=data_name, size_threshold=0)
    write_export_info(folder / name, OnnxExportInfo(name, "abcdef0123", "tiny.safetensors", "sd1", "mid", "fp32"))
    written = [name, name.replace(".onnx", ".json")] + ([data_name] if external else [])
    if refit_map:
        (folder / f"{name}.refit.json").write_text("{}")
        written.append(f"{name}.refit.json")
    assert sorted(p.name for p in folder.iterdir() if p.name in written) == sorted(written)
    return written


def test_exports_are_listed_and_deleted_with_all_their_files(tmp_path):
    big = _write_export(tmp_path, "abcdef0123_mid_fp16.onnx", external=True, refit_map=True)
    small = _write_export(tmp_path, "abcdef0123_mid_fp32.onnx", external=False, refit_map=False)
    listed = list_exports(tmp_path)
    assert [(e["onnx_file"], e["lora_ready"]) for e in listed] == [(big[0], True), (small[0], False)]
    assert export_rows(listed)[1] == [small[0], "tiny.safetensors", "abcdef0123", "sd1", "mid", "fp32",
                                      "export again"]
    deleted = delete_export(tmp_path, big[0])
    assert sorted(deleted["removed"]) == sorted(big) and deleted["onnx_file"] == big[0]
    remaining = sorted(p.name for p in export_service.onnx_folder(tmp_path).iterdir())
    assert remaining == sorted(small)
    assert [e["onnx_file"] for e in list_exports(tmp_path)] == [small[0]]


def test_listing_reads_no_refit_map_as_export_info(tmp_path, caplog):
    """Refit maps (``<name>.onnx.refit.json``) sit beside the info files; listing used to read them
    as info and log "ignoring the unreadable export info" on every listing."""
    written = _write_export(tmp_path, "abcdef0123_mid_fp16.onnx", external=False, refit_map=True)
    with caplog.at_level("WARNING", logger="seg_tsam"):
        assert [e["onnx_file"] for e in list_exports(tmp_path)] == [written[0]]
    assert caplog.records == []


def test_interrupted_exports_leave_no_working_folder_after_a_restart(tmp_path):
    """An export killed mid-way leaves ``.<name>.onnx.<random>.tmp``; the start-up cleanup removes
    exactly those folders."""
    from seg_tsam.export.onnx_exports import remove_interrupted_exports

    kept = _write_export(tmp_path, "abcdef0123_mid_fp32.onnx", external=False, refit_map=True)
    folder = export_service.onnx_folder(tmp_path)
    left = [folder / ".abcdef0123_mid_fp16.onnx.k3j_x9a1.tmp", folder / ".x.onnx.abc.tmp"]
    for path in left:
        (path / "traced").mkdir(parents=True)
        (path / "traced" / "model.onnx").write_bytes(b"half written")
    others = [folder / ".hidden", folder / "notes.tmp", folder / ".y.onnx.tmp"]
    others[0].mkdir()
    others[1].mkdir()
    others[2].write_bytes(b"a file, not a working folder")
    assert remove_interrupted_exports(folder) == sorted(path.name for path in left)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*kept, *(path.name for path in others)])
    assert remove_interrupted_exports(tmp_path / "absent") == []


def test_the_api_default_precision_is_the_webui_s(tmp_path):
    assert ExportRequest.from_json({"preset": "SD1.x 512-768"}, default_precision="fp32").precision == "fp32"
    assert ExportRequest.from_json({"preset": "SD1.x 512-768", "precision": "fp16"},
                                   default_precision="fp32").precision == "fp16"


def test_delete_finds_the_external_data_by_name_without_reading_the_model(tmp_path):
    written = _write_export(tmp_path, "abcdef0123_mid_fp16.onnx", external=True, refit_map=False)
    folder = export_service.onnx_folder(tmp_path)
    (folder / written[0]).write_bytes(b"unreadable: the model is never parsed")
    left_by_a_crash = folder / f"{written[0]}.ffffffff.data"
    left_by_a_crash.write_bytes(b"data of an export this one replaced")
    kept = [folder / f"{written[0]}.notes.data", folder / "abcdef0123_mid_fp16.onnx2.0a1b2c3d.data"]
    for path in kept:
        path.write_bytes(b"not this export's")
    removed = delete_export(tmp_path, written[0])["removed"]
    assert sorted(removed) == sorted([*written, left_by_a_crash.name])
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in kept)


@pytest.mark.parametrize("name", ["../abcdef0123_mid_fp32.onnx", "sub/x.onnx", "x.json", "", None, "x.onnx\n",
                                  "/tmp/x.onnx", "x" * 200 + ".onnx"])
def test_delete_export_refuses_malformed_names(tmp_path, name):
    with pytest.raises(ExportRequestError, match="not an ONNX export name"):
        delete_export(tmp_path, name)


def test_delete_export_of_an_unlisted_file_is_not_found_and_touches_nothing(tmp_path):
    folder = export_service.onnx_folder(tmp_path)
    folder.mkdir(parents=True)
    (folder / "stray_mid_fp32.onnx").write_bytes(b"not listed: no info file")
    for name in ("stray_mid_fp32.onnx", "abcdef0123_mid_fp32.onnx"):
        with pytest.raises(ExportNotFound, match="no ONNX export named"):
            delete_export(tmp_path, name)
    assert (folder / "stray_mid_fp32.onnx").is_file()


# --- the export on a tiny WebUI (ldm) UNet ----------------------------------------------------------


def test_export_current_checkpoint_ldm(tmp_path, monkeypatch):
    test_onnx_export = pytest.importorskip("test_onnx_export")
    if not test_onnx_export.WEBUI_ROOT:
        pytest.skip("SEG_TSAM_WEBUI_ROOT is not set (a WebUI checkout with repositories/)")
    from seg_tsam.export.onnx_export import hooked_modules, keep_installed_attention

    modules_gen = test_onnx_export.openaimodel_modules.__wrapped__()
    modules = next(modules_gen)
    try:
        monkeypatch.setattr(modules["ldm"], "th", test_onnx_export.WebUICatShim())
        unet = test_onnx_export.tiny_openai_unet(modules, "ldm")
        sd_model = types.SimpleNamespace(sd_checkpoint_info=_info("abcdef0123", "tiny-sd1"), is_sdxl=False,
                                         is_sd2=False, model=types.SimpleNamespace(diffusion_model=unet))
        steps: list[str] = []
        result = export_current_checkpoint(
            sd_model, ExportRequest(precision="fp32"), models_dir=tmp_path, attention_path=keep_installed_attention,
            progress=lambda fraction, text: steps.append(text),
            tensorrt_check=lambda: (False, "tensorrt is not installed"),
        )
        assert result.onnx_file == "Unet-seg-onnx/abcdef0123_mid_fp32.onnx"
        assert (tmp_path / result.onnx_file).is_file()
        assert result.static_check_ok and "OK" in result.static_check_summary
        assert not result.engine_built and result.engine_id is None
        assert result.engine_not_built_reason.startswith("tensorrt is not installed")
        assert export_service.NO_TENSORRT_HINT in result.engine_not_built_reason
        assert steps and hooked_modules(unet) == []
        refit_map = refit_map_beside(tmp_path / result.onnx_file)  # for LoRA: every UNet weight found in the file
        assert refit_map.problems(unet) == [] and not refit_map.unmapped
        assert result.to_dict()["static_check"]["ok"] and "No TensorRT engine" in result.to_markdown()

        skipped = export_current_checkpoint(
            sd_model, ExportRequest(precision="fp32", build_engine=False), models_dir=tmp_path,
            attention_path=keep_installed_attention, tensorrt_check=lambda: pytest.fail("must not be asked"),
        )
        assert skipped.engine_not_built_reason == "not requested"
        with pytest.raises(ExportRequestError, match="SEG layers 'd9'"):
            export_current_checkpoint(sd_model, ExportRequest(seg_layers="d9"), models_dir=tmp_path,
                                      attention_path=keep_installed_attention)
    finally:
        modules_gen.close()


def test_messages_are_shown_as_text_not_markup():
    """An error such as "expected <i>…</i>" lost its angle brackets in the tab's Markdown (which,
    like Gradio's, passes HTML through): rendered by a CommonMark renderer with HTML on."""
    markdown_it = pytest.importorskip("markdown_it", reason="markdown-it-py (a CommonMark renderer) is not installed")

    shown = export_service.plain_markdown("dtype <i>float16</i> vs *float32* in down_blocks_1")
    rendered = markdown_it.MarkdownIt("commonmark", {"html": True}).render(shown)
    assert "<i>" not in rendered and "<em>" not in rendered
    assert "&lt;i&gt;float16&lt;/i&gt;" in rendered and "*float32*" in rendered and "down_blocks_1" in rendered
