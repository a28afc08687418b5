#!/usr/bin/env bash
# Run the live-WebUI tests against a WebUI prepared by setup_webui.sh.
#
# Usage: [SEG_TSAM_PHASES="api browser"] [SEG_TSAM_SCREENSHOTS=DIR] \
#          tests/webui/run_live_tests.sh TARGET [PORT] [-- pytest args…]
#   TARGET  the folder setup_webui.sh filled (stable-diffusion-webui/, venv/, hf-home/, checkpoints/)
#   PORT    loopback port for the WebUI (default 7871)
#   SEG_TSAM_PHASES  which phases run, in this order (default "api"):
#     api      1. starts the WebUI API-only (--nowebui) with only the test probe extension and
#                 records the image hashes of a few plain requests (the "without this extension"
#                 baseline); 2. restarts it with this extension as well and runs tests/webui/.
#     browser  3. starts the WebUI *with its UI* and this extension, on a data folder of its own,
#                 and runs tests/webui/test_browser.py in headless Chromium (Playwright, the
#                 system's /usr/bin/chromium: Debian package chromium, plus fonts-noto-color-emoji;
#                 never `playwright install`). Installs tests/webui/requirements-live.txt into the
#                 test venv first. Screenshots go to SEG_TSAM_SCREENSHOTS (default: a new temporary
#                 folder), named at the end.
#     crash    4. starts the WebUI with this extension, starts an export, kills the WebUI (SIGKILL)
#                 while the export writes its working folder, restarts it: no working folder may be
#                 left, and the exports list answers without warnings in the log.
#   e.g. SEG_TSAM_PHASES=browser tests/webui/run_live_tests.sh /work/live/a1111 7895
# The WebUI runs on 127.0.0.1 with a data folder of its own (extensions, settings; the model
# folders linked, except those the tests write: Lora, Unet-seg-onnx and Unet-seg-trt), so the
# WebUI's own folder is not touched. Stopped, and what the tests wrote removed, on exit; the
# WebUI logs stay.
set -euo pipefail
TARGET=$(cd "${1:?usage: run_live_tests.sh TARGET [PORT] [-- pytest args]}" && pwd); shift
PORT=7871
if [[ $# -gt 0 && $1 != "--" ]]; then PORT=$1; shift; fi
[[ ${1:-} == "--" ]] && shift
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
ROOT=$TARGET/stable-diffusion-webui
PHASES=" ${SEG_TSAM_PHASES:-api} "
for phase in $PHASES; do
  [[ $phase == api || $phase == browser || $phase == crash ]] ||
    { echo "SEG_TSAM_PHASES: unknown phase '$phase' (api, browser, crash)" >&2; exit 2; }
done
WRITTEN_BY_TESTS=" Lora Unet-seg-onnx Unet-seg-trt "

new_data_dir() {  # a data folder: extensions/, models/ (links), config.json
  local data
  data=$(mktemp -d)
  mkdir -p "$data/extensions" "$data/models"
  for folder in "$ROOT"/models/*; do
    [[ $WRITTEN_BY_TESTS == *" $(basename "$folder") "* ]] || ln -s "$folder" "$data/models/"
  done
  # Options the tests override per request, set explicitly: WebUI 1.10.1 restores an overridden
  # option only when it was set before (see OVERRIDDEN_OPTIONS in test_live_seg.py).
  echo '{"skip_early_cond": 0.0, "batch_cond_uncond": true, "seg_batch_rows": true, "sd_unet": "Automatic"}' \
    > "$data/config.json"
  ln -sfn "$REPO/tests/webui/probe_extension" "$data/extensions/zz-seg-tsam-probe"
  echo "$data"
}
DATA=$(new_data_dir)
EXTENSIONS=$DATA/extensions
# onnx and onnxruntime for the export tests, kept apart from the WebUI's venv (setup_webui.sh).
EXTRA_PATH=
[[ -d $TARGET/export-packages ]] && EXTRA_PATH=$TARGET/export-packages
PYTHON=${PYTHON:-$REPO/.venv/bin/python}  # the tests' Python (not the WebUI's)
[[ -x $PYTHON ]] || { echo "no Python at $PYTHON: create $REPO/.venv or set PYTHON=/path/to/venv/bin/python" >&2; exit 2; }
URL=http://127.0.0.1:$PORT
LOG=$DATA/webui.log
SERVER=

stop() {
  if [[ -n "$SERVER" ]]; then kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; SERVER=; fi
}
UI_DATA=
CRASH_DATA=
trap 'stop; rm -rf "$DATA/models"; for extra in "$UI_DATA" "$CRASH_DATA"; do [[ -z $extra ]] || rm -rf "$extra/models"; done' EXIT  # removes the links, not what they point to

start() {  # [--ui]: with the Gradio UI (the browser phase), else API-only
  local mode=--nowebui
  [[ ${1:-} == --ui ]] && mode=
  (cd "$ROOT" && HF_HOME=$TARGET/hf-home HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH=$EXTRA_PATH exec "$TARGET/venv/bin/python" launch.py \
    $mode --api --skip-prepare-environment --skip-torch-cuda-test --skip-python-version-check \
    --skip-version-check --no-download-sd-model --use-cpu all --no-half --precision full \
    --server-name 127.0.0.1 --port "$PORT" --data-dir "$DATA" --ckpt-dir "$TARGET/checkpoints" \
    --ckpt "$TARGET/checkpoints/tiny-sd1.safetensors") >>"$LOG" 2>&1 &
  SERVER=$!
  for _ in $(seq 1 150); do
    curl -sf "$URL/seg-tsam-probe/state" >/dev/null 2>&1 && { [[ -n $mode ]] || curl -sf "$URL/" >/dev/null 2>&1; } && return 0
    kill -0 "$SERVER" 2>/dev/null || { tail -40 "$LOG"; echo "the WebUI exited (log: $LOG)" >&2; exit 1; }
    sleep 2
  done
  echo "the WebUI did not answer within 5 minutes (log: $LOG)" >&2; exit 1
}

BASELINE=$DATA/baseline.json
status=0

if [[ $PHASES == *" api "* ]]; then
  echo "== baseline: WebUI without this extension"
  rm -f "$EXTENSIONS/sd-webui-seg-tsam"
  start
  SEG_TSAM_WEBUI_URL=$URL SEG_TSAM_RECORD_BASELINE=$BASELINE "$PYTHON" -m pytest "$REPO/tests/webui" -q -k baseline
  stop

  echo "== live tests: WebUI with this extension"
  ln -sfn "$REPO" "$EXTENSIONS/sd-webui-seg-tsam"
  start
  SEG_TSAM_WEBUI_URL=$URL SEG_TSAM_BASELINE=$BASELINE SEG_TSAM_WEBUI_MODELS=$DATA/models "$PYTHON" -m pytest "$REPO/tests/webui" -rs "$@" || status=$?
  stop
  echo "WebUI log: $LOG"
fi

if [[ $PHASES == *" browser "* ]]; then
  echo "== browser: WebUI with its UI and this extension, in headless Chromium"
  "$PYTHON" -m pip install -q -r "$REPO/tests/webui/requirements-live.txt"
  UI_DATA=$(new_data_dir)
  DATA=$UI_DATA
  LOG=$DATA/webui.log
  ln -sfn "$REPO" "$DATA/extensions/sd-webui-seg-tsam"
  SHOTS=${SEG_TSAM_SCREENSHOTS:-$(mktemp -d)}
  mkdir -p "$SHOTS"
  start --ui
  SEG_TSAM_WEBUI_UI_URL=$URL SEG_TSAM_SCREENSHOTS=$SHOTS "$PYTHON" -m pytest "$REPO/tests/webui/test_browser.py" -rsw "$@" || status=$?
  stop
  echo "WebUI log (browser phase): $LOG"
  echo "screenshots: $SHOTS"
fi

if [[ $PHASES == *" crash "* ]]; then
  echo "== crash: an export killed mid-way, then a restart"
  CRASH_DATA=$(new_data_dir)
  DATA=$CRASH_DATA
  LOG=$DATA/webui.log
  ln -sfn "$REPO" "$DATA/extensions/sd-webui-seg-tsam"
  ONNX_DIR=$DATA/models/Unet-seg-onnx
  start
  curl -s -o /dev/null -X POST "$URL/seg-tsam/export" -H 'Content-Type: application/json' \
    -d '{"preset": "SD1.x 512-768", "precision": "fp32", "seg_layers": "all", "build_engine": false}' &
  CLIENT=$!
  WORK=
  for _ in $(seq 1 600); do  # the working folder appears when tracing starts
    WORK=$(find "$ONNX_DIR" -maxdepth 1 -type d -name '.*.onnx.*.tmp' 2>/dev/null | head -1 || true)  # no folder yet: empty
    [[ -n $WORK ]] && break
    sleep 0.1
  done
  kill -9 "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; SERVER=
  wait "$CLIENT" 2>/dev/null || true
  crash_status=0
  if [[ -z $WORK || ! -d $WORK ]]; then
    echo "FAILED: the export's working folder never appeared in $ONNX_DIR (or vanished before the kill)"; crash_status=1
  else
    echo "killed the WebUI while $(basename "$WORK") was being written"
    : >"$LOG.after"
    LOG_BEFORE=$LOG; LOG=$LOG.after
    start
    LISTED=$(curl -sf "$URL/seg-tsam/exports" || echo "no answer")
    stop
    LEFT=$(find "$ONNX_DIR" -maxdepth 1 -name '.*.tmp' | wc -l)
    if [[ $LEFT -ne 0 ]]; then echo "FAILED: $LEFT working folder(s) left after the restart"; crash_status=1; fi
    if [[ $LISTED != '{"exports":[]}' ]]; then echo "FAILED: the exports list after the restart: $LISTED"; crash_status=1; fi
    if grep -q "ignoring the unreadable export info" "$LOG"; then echo "FAILED: the log warns about export info"; crash_status=1; fi
    grep -q "removed the working folders of interrupted exports" "$LOG" ||
      { echo "FAILED: the restart did not report the clean-up"; crash_status=1; }
    LOG=$LOG_BEFORE
  fi
  if [[ $crash_status -eq 0 ]]; then echo "crash phase: 1 passed, 0 failed"; else echo "crash phase: 0 passed, 1 failed"; status=1; fi
  echo "WebUI logs (crash phase): $LOG $LOG.after"
fi
exit "$status"
