#!/usr/bin/env bash
# Run the live tests against a Forge-family WebUI (Forge Neo, lllyasviel Forge, reForge).
#
# Usage: tests/forge/run_live_tests.sh TARGET VARIANT [PORT] [-- pytest args…]
#   TARGET   the folder holding one prepared host per variant: TARGET/VARIANT/host.env gives ROOT,
#            PYTHON (the WebUI's), CKPT_DIR, ENV=(…) and FLAGS=(…) (the checkpoints forge-sd1 and
#            forge-sdxl must be in CKPT_DIR)
#   VARIANT  neo | forge | reforge
#   PORT     loopback port for the WebUI (default 7921)
#   e.g. tests/forge/run_live_tests.sh /work/live/forge neo 7921 -- -k forge-sd1
# Phases:
#   1. baseline: starts the WebUI API-only (--nowebui) with only the test probe extension
#      (tests/forge/probe_extension) and records the image hashes of a few plain requests;
#   2. live: restarts it with this extension and the T-SAM probe (tests/forge/tsam_probe) as well
#      (links to this repository) and runs tests/forge with SEG_TSAM_WEBUI_URL, SEG_TSAM_BASELINE and SEG_TSAM_FORGE_VARIANT.
# The WebUI runs on 127.0.0.1 with a data folder of its own (--data-dir: extensions/, config.json,
# models/ as links to the WebUI's), so the WebUI's own folder is not touched. The server is stopped
# and the links removed on exit; the data folder with the WebUI log, the pytest logs and the
# measurements (round-off, bounds, SEG's effects; JSON lines) stays.
# The tests run with SEG_TSAM_TEST_PYTHON (default: this repository's .venv).
set -euo pipefail
usage="usage: run_live_tests.sh TARGET VARIANT [PORT] [-- pytest args]"
TARGET=$(cd "${1:?$usage}" && pwd); shift
VARIANT=${1:?$usage}; shift
[[ $VARIANT == neo || $VARIANT == forge || $VARIANT == reforge ]] ||
  { echo "VARIANT must be neo, forge or reforge, not '$VARIANT'" >&2; exit 2; }
PORT=7921
if [[ $# -gt 0 && $1 != "--" ]]; then PORT=$1; shift; fi
[[ ${1:-} == "--" ]] && shift
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HOST_ENV=$TARGET/$VARIANT/host.env
[[ -f $HOST_ENV ]] || { echo "no $HOST_ENV: prepare the host first" >&2; exit 2; }
# shellcheck source=/dev/null
source "$HOST_ENV"  # ROOT, PYTHON, CKPT_DIR, ENV=(…), FLAGS=(…)
WEBUI_PYTHON=$PYTHON
TEST_PYTHON=${SEG_TSAM_TEST_PYTHON:-$REPO/.venv/bin/python}
[[ -x $TEST_PYTHON ]] || { echo "no Python at $TEST_PYTHON: create $REPO/.venv or set SEG_TSAM_TEST_PYTHON" >&2; exit 2; }
"$WEBUI_PYTHON" -c 'import torch' 2>/dev/null || { echo "the WebUI's Python ($WEBUI_PYTHON) cannot import torch" >&2; exit 2; }
URL=http://127.0.0.1:$PORT
if curl -s -o /dev/null --max-time 2 "$URL/"; then
  echo "something already answers on $URL: choose another PORT" >&2; exit 2
fi

DATA=$(mktemp -d "${TMPDIR:-/tmp}/seg-tsam-forge-$VARIANT.XXXXXX")
mkdir -p "$DATA/extensions" "$DATA/models"
for folder in "$ROOT"/models/*; do ln -s "$folder" "$DATA/models/"; done
# Options the tests override per request, set explicitly (an overridden option is restored only if
# it was set before). "Resolution Step" 8: Forge Neo rounds a hires pass's size to it (odd sizes).
# VERSION_UID: without it Forge Neo takes the new config for an old one and waits for Enter
# (modules/launch_utils.py verify_version).
echo '{"skip_early_cond": 0.0, "seg_batch_rows": true, "res_step": 8, "VERSION_UID": "PY313"}' > "$DATA/config.json"
LOG=$DATA/webui.log
# The hosts read extensions from --data-dir (modules/paths_internal.py); if this one does not,
# link into its own extensions/ instead and remove the links on exit.
EXTENSIONS=$DATA/extensions
ROOT_LINKS=()
if ! grep -q 'extensions_dir = os.path.join(data_path, "extensions")' "$ROOT/modules/paths_internal.py"; then
  echo "this WebUI does not read extensions from --data-dir: linking into $ROOT/extensions"
  EXTENSIONS=$ROOT/extensions
fi
PROBE_LINK=$EXTENSIONS/zz-seg-tsam-forge-probe-$$
EXTENSION_LINK=$EXTENSIONS/sd-webui-seg-tsam-$$
TSAM_PROBE_LINK=$EXTENSIONS/zz-seg-tsam-forge-tsam-probe-$$
[[ $EXTENSIONS == "$DATA/extensions" ]] || ROOT_LINKS=("$PROBE_LINK" "$EXTENSION_LINK" "$TSAM_PROBE_LINK")
ln -sfn "$REPO/tests/forge/probe_extension" "$PROBE_LINK"
SERVER=

stop() {
  if [[ -n "$SERVER" ]]; then kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; SERVER=; fi
}
cleanup() {
  stop
  rm -rf "$DATA/models"  # the links, not what they point to
  for link in "${ROOT_LINKS[@]}"; do rm -f "$link"; done
}
trap cleanup EXIT

start() {
  (cd "$ROOT" && exec env "${ENV[@]}" "$WEBUI_PYTHON" launch.py "${FLAGS[@]}" --api --nowebui \
    --server-name 127.0.0.1 --port "$PORT" --data-dir "$DATA") </dev/null >>"$LOG" 2>&1 &
  SERVER=$!
  for _ in $(seq 1 150); do
    curl -sf "$URL/seg-tsam-probe/state" >/dev/null 2>&1 && return 0
    kill -0 "$SERVER" 2>/dev/null || { tail -40 "$LOG"; echo "the WebUI exited (log: $LOG)" >&2; exit 1; }
    sleep 2
  done
  echo "the WebUI did not answer within 5 minutes (log: $LOG)" >&2; exit 1
}

BASELINE=$DATA/baseline.json
status=0
export SEG_TSAM_FORGE_VARIANT=$VARIANT SEG_TSAM_WEBUI_URL=$URL

echo "== $VARIANT baseline: WebUI without this extension (data folder $DATA)"
T0=$SECONDS
start
echo "   WebUI ready after $((SECONDS - T0)) s"
SEG_TSAM_RECORD_BASELINE=$BASELINE "$TEST_PYTHON" -m pytest "$REPO/tests/forge" -q -p no:cacheprovider \
  -k baseline 2>&1 | tee "$DATA/pytest-baseline.log" || status=$?
stop
BASELINE_TIME=$((SECONDS - T0))
echo "== baseline phase: ${BASELINE_TIME} s"
[[ $status -eq 0 && -s $BASELINE ]] || { echo "recording the baseline failed (log: $LOG)" >&2; exit 1; }

echo "== $VARIANT live tests: WebUI with this extension"
T1=$SECONDS
ln -sfn "$REPO" "$EXTENSION_LINK"
ln -sfn "$REPO/tests/forge/tsam_probe" "$TSAM_PROBE_LINK"
start
echo "   WebUI ready after $((SECONDS - T1)) s"
SEG_TSAM_BASELINE=$BASELINE SEG_TSAM_FORGE_MEASUREMENTS=$DATA/measurements.jsonl "$TEST_PYTHON" -m pytest "$REPO/tests/forge" -p no:cacheprovider -rfEs "$@" 2>&1 |
  tee "$DATA/pytest-live.log" || status=$?
stop
LIVE_TIME=$((SECONDS - T1))
echo "== summary ($VARIANT)"
echo "   baseline phase: ${BASELINE_TIME} s; live phase: ${LIVE_TIME} s"
echo "   pytest: $(grep -E '^=+ .*(passed|failed|skipped|error).* in [0-9.]+s' "$DATA/pytest-live.log" | tail -1 | tr -d '=')"
echo "   WebUI log: $LOG; pytest log: $DATA/pytest-live.log; measurements: $DATA/measurements.jsonl"
exit "$status"
