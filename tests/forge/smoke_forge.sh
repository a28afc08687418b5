#!/usr/bin/env bash
# Smoke test of a host prepared by setup_forge.sh: start the WebUI API-only, list the models, make a
# 64x64, 4-step Euler image with each of the two checkpoints, stop the WebUI.
#
# Usage:
#   smoke_forge.sh HOST_DIR [--port N] [--timeout S] [--log FILE]
#
#   HOST_DIR     TARGET/VARIANT of setup_forge.sh (the folder with host.env)
#   --port N     port on 127.0.0.1 (default 7901; must be free)
#   --timeout S  seconds to wait for the API (default 300)
#   --log FILE   the WebUI's output (default HOST_DIR/smoke.log)
#
# Prints the start-up time, the models' titles and, per checkpoint, HTTP status, wall time and the
# image's size and pixel spread. Exit status 0 only if everything answered as expected. The WebUI
# runs in its own process group, which is killed on exit.
set -euo pipefail

HOST_DIR= PORT=7901 TIMEOUT=300 LOG=
while [[ $# -gt 0 ]]; do
  case "$1" in
    --port) PORT=$2; shift 2 ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    --log) LOG=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "unknown argument: $1" >&2; exit 2 ;;
    *) HOST_DIR=$1; shift ;;
  esac
done
[[ -f $HOST_DIR/host.env ]] || { echo "no host.env in '$HOST_DIR' (run setup_forge.sh first)" >&2; exit 2; }
# shellcheck disable=SC1091
source "$HOST_DIR/host.env"
LOG=${LOG:-$HOST_DIR/smoke.log}
URL=http://127.0.0.1:$PORT
! curl -s -o /dev/null "$URL/" || { echo "port $PORT is in use" >&2; exit 2; }

cd "$ROOT"
START=$(date +%s.%N)
set -m   # job control: the WebUI gets a process group of its own, so all of it can be stopped
env "${ENV[@]}" "$PYTHON" launch.py "${FLAGS[@]}" --api --nowebui --server-name 127.0.0.1 --port "$PORT" \
  >"$LOG" 2>&1 </dev/null &
PID=$!
set +m
stop() { kill -- "-$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; }
trap stop EXIT
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(date +%s.%N)"; }

until curl -sf -o /dev/null "$URL/sdapi/v1/sd-models"; do
  kill -0 "$PID" 2>/dev/null || { echo "$VARIANT: the WebUI exited; see $LOG" >&2; tail -20 "$LOG" >&2; exit 1; }
  (( $(date +%s) - ${START%.*} < TIMEOUT )) || { echo "$VARIANT: no API after $TIMEOUT s; see $LOG" >&2; exit 1; }
  sleep 0.5
done
echo "$VARIANT: API ready after $(elapsed "$START") s (port $PORT)"

MODELS=$(curl -sf "$URL/sdapi/v1/sd-models")
title() { "$PYTHON" -c 'import json, sys
for m in json.load(sys.stdin):
    if m["model_name"] == sys.argv[1].rsplit(".", 1)[0] or m["filename"].endswith("/" + sys.argv[1]):
        print(m["title"]); break' "$1" <<<"$MODELS"; }
SD1_TITLE=$(title "$SD1_CKPT") SDXL_TITLE=$(title "$SDXL_CKPT")
echo "$VARIANT: sd-models: $("$PYTHON" -c 'import json, sys; print(json.dumps([m["title"] for m in json.load(sys.stdin)]))' <<<"$MODELS")"
[[ -n $SD1_TITLE && -n $SDXL_TITLE ]] || { echo "$VARIANT: a checkpoint is missing from the list" >&2; exit 1; }

# Decodes the first image of a txt2img reply; fails if there is none.
CHECK_IMAGE='import base64, io, json, sys
import numpy as np
from PIL import Image
reply = json.load(open(sys.argv[1]))
if not reply.get("images"):
    sys.exit("no image: " + json.dumps(reply)[:300])
image = Image.open(io.BytesIO(base64.b64decode(reply["images"][0])))
pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
print(f"{image.format} {image.size[0]}x{image.size[1]}, pixel std {pixels.std():.1f}")'
FAILED=0
for title in "$SD1_TITLE" "$SDXL_TITLE"; do
  body=$("$PYTHON" -c 'import json, sys; print(json.dumps({"prompt": "a cat", "steps": 4, "width": 64, "height": 64,
    "sampler_name": "Euler", "override_settings": {"sd_model_checkpoint": sys.argv[1]}}))' "$title")
  t0=$(date +%s.%N)
  code=$(curl -s -o "$HOST_DIR/smoke-response.json" -w '%{http_code}' -H 'Content-Type: application/json' \
    -d "$body" "$URL/sdapi/v1/txt2img") || code=000
  took=$(elapsed "$t0")
  info=$("$PYTHON" -c "$CHECK_IMAGE" "$HOST_DIR/smoke-response.json" 2>&1) || FAILED=1
  [[ $code == 200 ]] || FAILED=1
  echo "$VARIANT: txt2img [$title]: HTTP $code in $took s: $info"
done
exit "$FAILED"
