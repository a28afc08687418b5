"""SEG and T-SAM in the real WebUI page: user flows in headless Chromium, driven with Playwright.

Needs a WebUI *with its UI* (no ``--nowebui``), this extension and the tiny SD1 checkpoint;
``tests/webui/run_live_tests.sh`` starts one for its browser phase (``SEG_TSAM_PHASES=browser``).
Set ``SEG_TSAM_WEBUI_UI_URL`` (e.g. ``http://127.0.0.1:7895``) to run; skipped otherwise, and when
the ``playwright`` package (``tests/webui/requirements-live.txt``) or Chromium is missing.
Chromium is the system's (``SEG_TSAM_CHROMIUM``, default ``/usr/bin/chromium``; Debian package
``chromium``); ``playwright install`` is never needed. Each test saves a screenshot of its final
state to ``SEG_TSAM_SCREENSHOTS`` (default: a new temporary folder, named on stderr).

The tests assert what a person sees: labels, info text, the generation info under the gallery,
the message the WebUI shows in the results area, the images in the gallery, the export tab's
messages and tables. Every request the page makes to another host is aborted (offline machine).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from seg_tsam.extension.core import fields
from seg_tsam.extension.core.settings import SegSettings
from seg_tsam.extension.core.tsam import TsamSettings

UI_URL = os.environ.get("SEG_TSAM_WEBUI_UI_URL", "").rstrip("/")
CHROMIUM = os.environ.get("SEG_TSAM_CHROMIUM", "/usr/bin/chromium")


def _skip_reason() -> str | None:
    if not UI_URL:
        return "SEG_TSAM_WEBUI_UI_URL is not set (no live WebUI with its UI to test against)"
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is not installed (pip install -r tests/webui/requirements-live.txt)"
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)) and not shutil.which(CHROMIUM):
        return f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium; or set SEG_TSAM_CHROMIUM)"
    return None


SKIP_REASON = _skip_reason()
pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")

SEG = "script_txt2img_smoothed_energy_guidance"  #: elem_id prefix of the SEG accordion's widgets
TSAM = "script_txt2img_tsam_alignment"
PROMPT = "a red cat on a table"
GENERATION_TIMEOUT_MS = 300_000


def _shown_controls(cls, hidden: tuple[str, ...] = ()) -> list[tuple[str, str, str]]:
    """(widget, label, start of its info text) of every control the open accordion shows, from the
    settings fields themselves (the one definition the UI is built from)."""
    return [(field.name, field.spec.label, field.spec.info[:30]) for field in fields.fields_of(cls)
            if field.name != "enabled" and field.name not in hidden]


SEG_CONTROLS = _shown_controls(SegSettings, hidden=("hires_override", "hires_scale", "hires_sigma"))  # closed sub-accordion
TSAM_CONTROLS = _shown_controls(TsamSettings)


# --- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def screenshots() -> Path:
    folder = os.environ.get("SEG_TSAM_SCREENSHOTS")
    if folder:
        path = Path(folder)
        path.mkdir(parents=True, exist_ok=True)
    else:
        path = Path(tempfile.mkdtemp(prefix="seg-tsam-screenshots-"))
    yield path
    print(f"\nscreenshots: {path}", file=sys.stderr)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM)
        yield chromium
        chromium.close()


def _open_page(browser):
    """A fresh context and page on the WebUI (no state left by another test), 1400×1800 so both
    accordions show, once the WebUI's JavaScript has built the UI."""
    context = browser.new_context(viewport={"width": 1400, "height": 1800})
    context.route(lambda url: not url.startswith(UI_URL), lambda route: route.abort())  # offline: no CDN fonts
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(UI_URL + "/", wait_until="domcontentloaded", timeout=300_000)
    # the accordions' visible checkboxes are added by the WebUI's JavaScript once the UI is loaded
    page.locator(f"#{SEG}_enabled-visible-checkbox").wait_for(state="attached", timeout=300_000)
    return context, page


@pytest.fixture
def page(browser):
    context, page = _open_page(browser)
    yield page
    context.close()


# --- what a user does ----------------------------------------------------------------------------------


def open_accordion(page, accordion_id: str) -> None:
    """Click the accordion's header if it is closed (for an input accordion that also ticks it,
    as long as its checkbox was not clicked directly)."""
    header = page.locator(f"#{accordion_id} .label-wrap").first
    if "open" not in (header.get_attribute("class") or ""):
        header.click()
    page.locator(f"#{accordion_id} .label-wrap.open").first.wait_for()


def tick(page, accordion_id: str, on: bool = True) -> None:
    """Set the checkbox in the accordion's header."""
    page.locator(f"#{accordion_id}-visible-checkbox").set_checked(on)


def type_into(page, elem_id: str, value) -> None:
    """Type into a textbox, or into the number box of a slider, and leave the field."""
    box = page.locator(f"#{elem_id}").locator("textarea, input[type=text], input[type=number]").first
    box.fill(str(value))
    box.press("Tab")


def choose(page, container, option: str) -> None:
    """Pick ``option`` in a Gradio dropdown."""
    box = container.locator("input").first
    box.click()
    box.fill(option)
    container.locator("ul.options li", has_text=option).first.click()


def small_image_settings(page, tab: str = "txt2img") -> None:
    type_into(page, f"{tab}_prompt", PROMPT)
    type_into(page, f"{tab}_width", 64)
    type_into(page, f"{tab}_height", 64)
    type_into(page, f"{tab}_steps", 4)


_OUTPUTS_JS = """tab => {
    const app = gradioApp();
    const images = [...app.querySelectorAll('#' + tab + '_gallery img')]
        .filter(img => !img.closest('.livePreview')).map(img => img.src);
    const html = id => (app.querySelector('#' + id) || {}).innerHTML || '';
    return images.join('|') + '#' + html('html_info_' + tab) + '#' + html('html_log_' + tab);
}"""

_DONE_JS = """([tab, before]) => {
    const interrupt = gradioApp().querySelector('#' + tab + '_interrupt');
    if (interrupt && interrupt.style.display !== 'none') return false;  // shown while the job runs
    return (%s)(tab) !== before;
}""" % _OUTPUTS_JS


def click_generate(page, tab: str = "txt2img") -> dict:
    """Click Generate and wait until the job ended and its outputs are shown; return what the
    results area shows: the images, the generation info and the message area (html_log)."""
    before = page.evaluate(_OUTPUTS_JS, tab)
    page.locator(f"#{tab}_generate").click()
    page.wait_for_function(_DONE_JS, arg=[tab, before], timeout=GENERATION_TIMEOUT_MS)
    shown = page.evaluate(_OUTPUTS_JS, tab)
    for _ in range(20):  # until the results area holds still for half a second
        page.wait_for_timeout(500)
        shown, previous = page.evaluate(_OUTPUTS_JS, tab), shown
        if shown == previous:
            break
    return results(page, tab)


def results(page, tab: str = "txt2img") -> dict:
    images = page.evaluate("""tab => [...new Set([...gradioApp().querySelectorAll('#' + tab + '_gallery img')]
        .filter(img => !img.closest('.livePreview')).map(img => img.src))]""", tab)
    return {"images": images,
            "info": page.locator(f"#html_info_{tab}").first.inner_text(),  # Gradio repeats the id inside
            "log": page.locator(f"#html_log_{tab}").first.inner_text(),
            "error": " ".join(page.locator(f"#html_log_{tab} .error").all_inner_texts())}


def shot(page, screenshots: Path, name: str, locator=None) -> Path:
    path = screenshots / name
    (locator or page).screenshot(path=str(path))
    return path


# --- tests -----------------------------------------------------------------------------------------------


def test_accordions_show_labelled_controls_with_info(page, screenshots):
    for accordion in (SEG, TSAM):
        header = page.locator(f"#{accordion}_enabled .label-wrap").first
        assert header.is_visible(), f"the accordion #{accordion}_enabled is not on the txt2img tab"
        open_accordion(page, f"{accordion}_enabled")
    page.locator(f"#{SEG}_enabled").scroll_into_view_if_needed()
    assert "Smoothed Energy Guidance" in page.locator(f"#{SEG}_enabled .label-wrap").first.inner_text()
    assert "T-SAM alignment" in page.locator(f"#{TSAM}_enabled .label-wrap").first.inner_text()
    missing = []
    for prefix, controls in ((SEG, SEG_CONTROLS), (TSAM, TSAM_CONTROLS)):
        for name, label, info in controls:
            widget = page.locator(f"#{prefix}_{name}")
            if not widget.get_by_text(label, exact=True).first.is_visible():
                missing.append(f"{prefix}_{name}: label {label!r}")
            if not widget.get_by_text(info).first.is_visible():
                missing.append(f"{prefix}_{name}: info {info!r}")
    shot(page, screenshots, "txt2img-accordions.png")
    assert not missing, "not visible: " + "; ".join(missing)
    for accordion in (SEG, TSAM):  # both accordions fit the 1400×1800 window
        box = page.locator(f"#{accordion}_enabled").bounding_box()
        assert box is not None and box["height"] > 100


def test_hires_values_are_editable_only_with_their_override(page, screenshots):
    open_accordion(page, f"{SEG}_enabled")
    page.locator(f"#{SEG}_enabled").get_by_text("Hires. fix second pass", exact=True).first.click()
    number = page.locator(f"#{SEG}_hires_scale input[type=number]").first
    number.wait_for(state="visible")
    override = page.locator(f"#{SEG}_hires_override input[type=checkbox]").first
    assert number.is_disabled(), "the hires scale is editable while the override is off"
    override.set_checked(True)
    page.wait_for_function(f"() => !gradioApp().querySelector('#{SEG}_hires_scale input[type=number]').disabled")
    shot(page, screenshots, "seg-hires-override.png")
    override.set_checked(False)
    page.wait_for_function(f"() => gradioApp().querySelector('#{SEG}_hires_scale input[type=number]').disabled")


def test_seg_generation_shows_seg_in_the_generation_info(page, screenshots):
    open_accordion(page, f"{SEG}_enabled")
    tick(page, f"{SEG}_enabled")
    small_image_settings(page)
    shown = click_generate(page)
    shot(page, screenshots, "seg-generation.png")
    assert not shown["error"], shown["error"]
    assert shown["images"], shown
    assert "SEG scale" in shown["info"], shown["info"]
    assert "Steps: 4" in shown["info"] and "Size: 64x64" in shown["info"], shown["info"]


def test_bad_layers_message_shows_in_the_results_area(page, screenshots):
    open_accordion(page, f"{SEG}_enabled")
    tick(page, f"{SEG}_enabled")
    small_image_settings(page)
    type_into(page, f"{SEG}_layers", "z9")
    shown = click_generate(page)
    shot(page, screenshots, "seg-bad-layers.png")
    assert page.locator("#html_log_txt2img .error").first.is_visible(), shown
    assert "Smoothed Energy Guidance" in shown["error"] and "z9" in shown["error"], shown


def test_switched_off_seg_ignores_a_bad_layers_value(page, screenshots):
    open_accordion(page, f"{SEG}_enabled")
    small_image_settings(page)
    type_into(page, f"{SEG}_layers", "z9")
    tick(page, f"{SEG}_enabled", False)
    shown = click_generate(page)
    shot(page, screenshots, "seg-off-bad-layers.png")
    assert not shown["error"], f"SEG is off, yet: {shown['error']}"
    assert shown["images"], shown
    assert "SEG" not in shown["info"], shown["info"]


def test_tsam_show_maps_adds_a_maps_image(page, screenshots):
    open_accordion(page, f"{TSAM}_enabled")
    tick(page, f"{TSAM}_enabled")
    page.locator(f"#{TSAM}_show_maps input[type=checkbox]").set_checked(True)
    small_image_settings(page)
    shown = click_generate(page)
    assert not shown["error"], shown["error"]
    assert "T-SAM strength" in shown["info"], shown["info"]
    assert len(shown["images"]) == 2, f"expected the image and its maps, the gallery shows {len(shown['images'])}"
    page.locator("#txt2img_gallery .thumbnail-item").nth(1).click()
    preview = page.locator("#txt2img_gallery .preview img").first
    preview.click()  # the WebUI's lightbox shows the image large
    modal = page.locator("#lightboxModal")
    try:
        modal.wait_for(state="visible", timeout=10_000)
        shot(page, screenshots, "tsam-maps.png")
    except Exception:  # the lightbox is off in Settings: the gallery's own preview
        shot(page, screenshots, "tsam-maps.png", page.locator("#txt2img_gallery"))


def test_send_to_img2img_keeps_seg_on_with_its_values(page, screenshots):
    open_accordion(page, f"{SEG}_enabled")
    tick(page, f"{SEG}_enabled")
    type_into(page, f"{SEG}_scale", 4.5)
    type_into(page, f"{SEG}_layers", "all")
    small_image_settings(page)
    shown = click_generate(page)
    assert not shown["error"] and "SEG scale: 4.5" in shown["info"], shown
    page.locator("#txt2img_send_to_img2img").click()
    page.locator("#tab_img2img").wait_for(state="visible")
    target = "script_img2img_smoothed_energy_guidance"
    scale = page.locator(f"#{target}_scale input[type=number]")
    layers = page.locator(f"#{target}_layers").locator("textarea, input").first
    checkbox = page.locator(f"#{target}_enabled-visible-checkbox")
    deadline = time.monotonic() + 20  # the WebUI pastes the parameters a moment after switching tabs
    while time.monotonic() < deadline and not (scale.input_value() == "4.5" and checkbox.is_checked()):
        page.wait_for_timeout(250)
    seen = {"ticked": checkbox.is_checked(), "scale": scale.input_value(), "layers": layers.input_value()}
    page.locator(f"#{target}_enabled").scroll_into_view_if_needed()
    shot(page, screenshots, "img2img-after-send.png")
    assert seen["scale"] == "4.5" and seen["layers"] == "all", seen
    assert seen["ticked"], f"the img2img SEG accordion is not ticked after 'Send to img2img': {seen}"


def test_xyz_plot_with_a_bad_seg_scale_names_the_value(page, screenshots):
    open_accordion(page, f"{SEG}_enabled")
    tick(page, f"{SEG}_enabled")
    small_image_settings(page)
    choose(page, page.locator("#tab_txt2img #script_list"), "X/Y/Z plot")
    choose(page, page.locator("#script_txt2img_xyz_plot_x_type"), "[SEG] Scale")
    values = page.locator("#script_txt2img_xyz_plot_x_values textarea").first
    for _ in range(10):  # choosing the type clears the values a moment later (the WebUI's handler)
        page.wait_for_timeout(500)
        if values.input_value() == "-3, 2":
            break
        type_into(page, "script_txt2img_xyz_plot_x_values", "-3, 2")
    assert values.input_value() == "-3, 2"
    shown = click_generate(page)
    page.locator("#txt2img_results").scroll_into_view_if_needed()
    shot(page, screenshots, "xyz-bad-scale.png")
    assert "-3" in shown["log"], (f"no message names the bad value -3; message area: {shown['log']!r}, "
                                  f"{len(shown['images'])} image(s) shown")


def test_export_tab_exports_lists_and_deletes(page, screenshots):
    page.locator("#tabs > .tab-nav > button", has_text="SEG Export").click()
    tab = page.locator("#tab_seg_export")
    tab.wait_for(state="visible")
    page.locator("#seg_export_run").wait_for(state="visible")
    shot(page, screenshots, "export-tab.png")
    if page.locator("#seg_export_install").is_visible():
        pytest.skip("the WebUI's Python lacks onnx (the tab offers to install it)")
    status = page.locator("#seg_export_status").first
    # The live WebUI runs with --no-half, where an fp16 export fails: fp32 must be preselected, also
    # when the page was built before the model finished loading. The export below uses the default.
    preselected = page.locator("#seg_export_precision input:checked")
    assert preselected.input_value() == "fp32", "the tab preselects fp16 on a --no-half WebUI"
    before = {line.strip() for line in tab.inner_text().splitlines()}
    page.locator("#seg_export_run").click()
    seen: list[str] = []
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        text = status.inner_text()
        if re.search(r"ONNX written|failed|Invalid request", text):
            break
        progress = tab.inner_text()
        if not seen or seen[-1] != progress:
            seen.append(progress)
        page.wait_for_timeout(250)
    text = status.inner_text()
    shot(page, screenshots, "export-done.png")
    assert "ONNX written" in text, text
    name = re.search(r"Unet-seg-onnx/(\S+?\.onnx)", text).group(1)
    table = page.locator("#seg_export_onnx_files").first
    assert name in table.inner_text(), f"{name} is not in the exports table"

    # click its row, which selects it; delete; confirm the browser's question
    table.get_by_text(name, exact=True).first.click()
    name_box = page.locator("#seg_export_delete_onnx_name").locator("textarea, input").first
    page.wait_for_function("name => [...gradioApp().querySelectorAll('#seg_export_delete_onnx_name textarea, "
                           "#seg_export_delete_onnx_name input')].some(box => box.value === name)",
                           arg=name, timeout=30_000)
    questions: list[str] = []

    def answer(dialog):
        questions.append(dialog.message)
        dialog.accept()

    page.once("dialog", answer)
    page.locator("#seg_export_delete_onnx").click()
    page.wait_for_function("() => gradioApp().querySelector('#seg_export_onnx_status').innerText.includes('Deleted')",
                           timeout=60_000)
    page.wait_for_timeout(500)
    shot(page, screenshots, "export-deleted.png")
    message = page.locator("#seg_export_onnx_status").first.inner_text()
    assert questions and name in questions[0], questions  # asked before deleting
    assert name in message and name not in table.inner_text(), message
    assert name_box.input_value() == "", "the deleted name stays in the box"

    (screenshots / "export-progress.txt").write_text(  # what the tab showed while the export ran
        "\n\n---\n\n".join(seen), encoding="utf-8")
    generic = re.compile(r"^(processing|pending|queue|eta)\b.*|^[\d.]+(/[\d.]+)?\s*s$|^\|$", re.I)  # Gradio's timer
    new_lines = [line.strip() for progress in seen for line in progress.splitlines()
                 if line.strip() and line.strip() not in before and not generic.match(line.strip())]
    timers = sorted({line.strip() for progress in seen for line in progress.splitlines() if generic.match(line.strip())})
    assert new_lines, ("no progress text in the tab while the export ran (only Gradio's timer: "
                       f"{', '.join(timers[:3])}{', …' if len(timers) > 3 else ''})")


def _select_checkpoint(name: str) -> None:
    """Load the checkpoint ``name`` through the WebUI's API (the UI's checkpoint box does the same)."""
    with urllib.request.urlopen(UI_URL + "/sdapi/v1/sd-models", timeout=60) as answer:
        title = next(model["title"] for model in json.load(answer) if model["model_name"] == name)
    request = urllib.request.Request(UI_URL + "/sdapi/v1/options", method="POST",
                                     data=json.dumps({"sd_model_checkpoint": title}).encode(),
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=600).close()


def test_export_profile_follows_the_checkpoint_loaded_when_the_page_opens(browser, screenshots):
    """The profile is preselected for the checkpoint loaded when the page opens, not the one loaded
    (or not yet loaded) when the WebUI built its UI: switch to the SDXL checkpoint, open the page.
    The page opens after the switch: a page opened before would undo it (its start-up sets the
    WebUI's checkpoint box, whose change event loads that checkpoint again)."""
    context = None
    try:
        _select_checkpoint("tiny-sdxl")
        context, page = _open_page(browser)
        page.locator("#tabs > .tab-nav > button", has_text="SEG Export").click()
        box = page.locator("#seg_export_preset input").first
        box.wait_for(state="visible")
        deadline = time.monotonic() + 30  # the page's load events fill in the value
        while box.input_value() != "SDXL 768-1024" and time.monotonic() < deadline:
            page.wait_for_timeout(250)
        shot(page, screenshots, "export-tab-sdxl.png")
        assert box.input_value() == "SDXL 768-1024", f"profile {box.input_value()!r} preselected for an SDXL checkpoint"
    finally:
        if context is not None:
            context.close()
        _select_checkpoint("tiny-sd1")
