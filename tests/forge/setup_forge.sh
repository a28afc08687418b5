#!/usr/bin/env bash
# Prepare one offline, CPU-only WebUI of the Forge family as a host for the extension's live tests.
#
# Usage:
#   setup_forge.sh VARIANT --mirrors DIR --target DIR [--python PY]
#
#   VARIANT        neo      Forge Neo (exo101/sd-webui-forge-neo-v3 5692d2d, its webui/ folder)
#                  forge    lllyasviel/stable-diffusion-webui-forge dfdcbab
#                  reforge  Panchovix/stable-diffusion-webui-reForge 3b56b268
#   --mirrors DIR  bare git copies of the sources, DIR/OWNER+NAME/repo (or OWNER+NAME.git,
#                  OWNER+NAME). Needed per variant:
#                    neo      exo101+sd-webui-forge-neo-v3
#                    forge    lllyasviel+stable-diffusion-webui-forge, lllyasviel+huggingface_guess,
#                             AUTOMATIC1111+stable-diffusion-webui-assets, salesforce+BLIP, openai+CLIP
#                    reforge  Panchovix+stable-diffusion-webui-reForge, AUTOMATIC1111+stable-diffusion-
#                             webui-assets, Stability-AI+stablediffusion (stands in for the pinned
#                             joypaul162 fork), Stability-AI+generative-models, crowsonkb+k-diffusion,
#                             salesforce+BLIP, openai+CLIP
#                  Used when present: lllyasviel+stable-diffusion-webui-forge and
#                  Panchovix+stable-diffusion-webui-reForge for the live-preview VAE-approx files
#                  the other variant lacks (else the SD1 file is copied under the SDXL name).
#   --target DIR   everything goes under DIR/VARIANT/:
#                    <source>/      the WebUI checkout: sd-webui-forge-neo-v3 (ROOT is its webui/),
#                                   stable-diffusion-webui-forge, stable-diffusion-webui-reForge
#                                   (forge, reforge: with repositories/ filled in)
#                    src/CLIP       openai/CLIP, installed as `clip` (forge, reforge)
#                    venv/          the WebUI's own virtual environment
#                    constraints.txt, requirements.txt   pins that keep pip on the local CPU torch
#                    checkpoints/   forge-sd1.safetensors, forge-sdxl.safetensors (random weights,
#                                   Forge-shaped; reforge links the ones of DIR/neo or DIR/forge)
#                    hf-home/       empty HF_HOME (nothing is read from the hub)
#                    host.env       what a test runner needs, for `source`:
#                                     VARIANT ROOT PYTHON CKPT_DIR SD1_CKPT SDXL_CKPT HF_HOME_DIR
#                                     ENV=(VAR=value ...)  environment for the WebUI process
#                                     FLAGS=(...)          launch.py flags of this host (offline,
#                                                          CPU, checkpoint folder); add --api,
#                                                          --nowebui, --server-name, --port yourself
#   --python PY    interpreter for the venv (default python3.11: the local torch wheel is cp311;
#                  Neo asks for 3.13 and Forge for 3.10, both only warn and run on 3.11).
#
# Launch (what tests/forge/smoke_forge.sh does):
#   source DIR/VARIANT/host.env
#   cd "$ROOT" && env "${ENV[@]}" "$PYTHON" launch.py "${FLAGS[@]}" --api --nowebui \
#     --server-name 127.0.0.1 --port PORT
#
# Steps: check out the sources at the pinned commits (blobs a mirror lacks are left out; Neo
# without its bundled third-party extensions/), make the venv and install the local CPU wheel
# torch==2.13.0 plus the WebUI's requirements under constraints (torch 2.13.0+cpu, torchvision
# 0.28.0, setuptools 80.9.0), guard torchvision's nms/qnms fake-op registrations (else `import
# torchvision` fails against the CPU torch), place models/VAE-approx/{model.pt,vaeapprox-sdxl.pt}
# (Forge and reForge would download them on the first image), build the checkpoints with
# tests/forge/make_tiny_checkpoints.py and verify that the host's own detection takes them
# (SD15 / SDXL), write host.env, and check at the end that torch is still the +cpu build.
# Everything comes from the local mirrors and the configured package index; nothing is fetched
# from GitHub or Hugging Face, at set-up or at run time. Re-running skips what is in place (the pip
# step is skipped while the requirements, constraints and python are unchanged).
#
# Measured on the 2-core, 23 GB machine (python 3.11.7, from scratch, run one after another while
# other processes shared the CPUs; tests/forge/smoke_forge.sh for the last three columns):
#              set-up   (venv+pip, checkpoints)     API ready   first txt2img 64x64, 4 steps, incl. load
#   neo        185 s    (86 s, 97 s: built)         14-26 s     SD1 3-8 s, SDXL 12-18 s
#   forge      171 s    (90 s, 79 s: built)         11-17 s     SD1 3-5 s, SDXL 9-15 s
#   reforge    101 s    (92 s, 8 s: linked+checked) 11-17 s     SD1 6-9 s, SDXL 21-27 s
#   A re-run with everything in place takes ~5 s (neo, forge) or ~11 s (reforge: the detection check).
#   Disk per host: venv 2.1-2.3 GB, checkpoints 2.5 GB (neo, forge; reforge links), checkout 115-370 MB.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

VARIANT= MIRRORS= TARGET= PY=
while [[ $# -gt 0 ]]; do
  case "$1" in
    neo|forge|reforge) [[ -z $VARIANT ]] || { echo "one VARIANT only" >&2; exit 2; }; VARIANT=$1; shift ;;
    --mirrors) MIRRORS=$2; shift 2 ;;
    --target) TARGET=$2; shift 2 ;;
    --python) PY=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ -n $VARIANT ]] || { echo "VARIANT (neo, forge or reforge) is required" >&2; exit 2; }
[[ -n $MIRRORS && -n $TARGET ]] || { echo "--mirrors and --target are required" >&2; exit 2; }
MIRRORS=$(cd "$MIRRORS" && pwd)
mkdir -p "$TARGET/$VARIANT"
TARGET=$(cd "$TARGET" && pwd)
HOST=$TARGET/$VARIANT
PY=$(command -v "${PY:-$(command -v python3.11 || command -v python3)}")

# Pinned commits: the WebUIs, and what their modules/launch_utils.py would clone.
NEO_COMMIT=5692d2d1e6c293faf5486f7cb18c27c9a3faa758
FORGE_COMMIT=dfdcbab685e57677014f05a3309b48cc87383167
REFORGE_COMMIT=3b56b268ad9158ee8b30900973b6ccda4ec22241
HFGUESS_COMMIT=84826248b49bb7ca754c73293299c4d4e23a548d
ASSETS_COMMIT=6f7db241d2f8ba7457bac5ca9753331f0c266917
LDM_COMMIT=cf1d67a6fd5ea1aa600c4df58e5b47da45f6bdbf   # reForge pins joypaul162's fork at f16630a9
SGM_COMMIT=45c443b316737a4ab6e40413d7794a7f5657c19f
KDIFF_COMMIT=ab527a9a6d347f364e3d185ba6d714e22d80cb3c
BLIP_COMMIT=48211a1594f1321b00f14c9f7a5b4813144b2fb9
CLIP_COMMIT=d50d76daa670286dd6cacf3bcd80b5e4823fc8e1

START=$SECONDS
log() { printf '[setup_forge %s +%ds] %s\n' "$VARIANT" $((SECONDS - START)) "$*" >&2; }
die() { echo "[setup_forge $VARIANT] error: $*" >&2; exit 1; }

# mirror NAME : the git dir of a mirrored repository, or nothing (status 1).
mirror() {
  local d
  for d in "$MIRRORS/$1/repo" "$MIRRORS/$1.git" "$MIRRORS/$1"; do
    [[ -f $d/HEAD && -d $d/objects ]] && { echo "$d"; return 0; }
  done
  return 1
}
need_mirror() { mirror "$1" || die "no mirror $1 under $MIRRORS"; }

# checkout NAME COMMIT DEST [PATTERN...] : clone mirror NAME into DEST at COMMIT. PATTERNs
# (sparse, no-cone) restrict the work tree; blobs the mirror lacks are excluded as well.
checkout() {
  local name=$1 commit=$2 dest=$3; shift 3
  if [[ -d $dest/.git && $(git -C "$dest" rev-parse HEAD 2>/dev/null) == "$commit" ]]; then
    log "$(basename "$dest") already at ${commit:0:8}"; return
  fi
  [[ ! -e $dest ]] || die "$dest exists but is not at $commit; remove it first"
  local src; src=$(need_mirror "$name")
  log "checking out $name ${commit:0:8} into $dest"
  git clone -q --no-checkout "$src" "$dest"
  local patterns=("$@") listing missing
  [[ ${#patterns[@]} -gt 0 ]] || patterns=('/*')
  listing=$(git -C "$dest" -c core.quotePath=false ls-tree -r "$commit" |
    awk -F'\t' '{split($1, a, " ")} a[2] == "blob" {print a[3] "\t" $2}')
  missing=$(cut -f1 <<<"$listing" | git -C "$dest" cat-file --batch-check | awk '$2 == "missing" {print $1}' |
    awk -F'\t' 'NR == FNR {gone[$1]; next} ($1 in gone) {print "!/" $2}' - <(echo "$listing"))
  if [[ -n $missing ]]; then
    log "  leaving out blobs the mirror lacks: $(tr '\n' ' ' <<<"$missing")"
    mapfile -t -O ${#patterns[@]} patterns <<<"$missing"
  fi
  [[ ${patterns[*]} == '/*' ]] || git -C "$dest" sparse-checkout set --no-cone "${patterns[@]}"
  local err
  err=$(git -C "$dest" -c advice.detachedHead=false checkout -q "$commit" 2>&1) || die "$err"
  grep -v -E '^error: invalid object|unable to read sha1' <<<"$err" >&2 || true
}

# blob NAME COMMIT PATH DEST : write one file of a mirrored repository (0 if it was there).
blob() {
  local src; src=$(mirror "$1") || return 1
  git --git-dir="$src" cat-file -e "$2:$3" 2>/dev/null || return 1
  git --git-dir="$src" cat-file blob "$2:$3" >"$4"
}

# 1. Sources ----------------------------------------------------------------------------------
T0=$SECONDS
case $VARIANT in
  neo)
    # Only webui/; its extensions/ are the redistribution's third-party extensions (and miss blobs).
    checkout exo101+sd-webui-forge-neo-v3 "$NEO_COMMIT" "$HOST/sd-webui-forge-neo-v3" '/webui/*' '!/webui/extensions/*'
    ROOT=$HOST/sd-webui-forge-neo-v3/webui
    ;;
  forge)
    ROOT=$HOST/stable-diffusion-webui-forge
    checkout lllyasviel+stable-diffusion-webui-forge "$FORGE_COMMIT" "$ROOT"
    mkdir -p "$ROOT/repositories"
    checkout lllyasviel+huggingface_guess "$HFGUESS_COMMIT" "$ROOT/repositories/huggingface_guess"
    checkout AUTOMATIC1111+stable-diffusion-webui-assets "$ASSETS_COMMIT" "$ROOT/repositories/stable-diffusion-webui-assets"
    checkout salesforce+BLIP "$BLIP_COMMIT" "$ROOT/repositories/BLIP"
    ;;
  reforge)
    ROOT=$HOST/stable-diffusion-webui-reForge
    checkout Panchovix+stable-diffusion-webui-reForge "$REFORGE_COMMIT" "$ROOT"
    mkdir -p "$ROOT/repositories"
    checkout AUTOMATIC1111+stable-diffusion-webui-assets "$ASSETS_COMMIT" "$ROOT/repositories/stable-diffusion-webui-assets"
    checkout Stability-AI+stablediffusion "$LDM_COMMIT" "$ROOT/repositories/stable-diffusion-stability-ai"
    checkout Stability-AI+generative-models "$SGM_COMMIT" "$ROOT/repositories/generative-models"
    checkout crowsonkb+k-diffusion "$KDIFF_COMMIT" "$ROOT/repositories/k-diffusion"
    checkout salesforce+BLIP "$BLIP_COMMIT" "$ROOT/repositories/BLIP"
    ;;
esac
if [[ $VARIANT != neo ]]; then
  mkdir -p "$HOST/src"
  checkout openai+CLIP "$CLIP_COMMIT" "$HOST/src/CLIP"
fi
mkdir -p "$ROOT/extensions"   # tests link the extension under test in here
log "sources ready ($((SECONDS - T0)) s)"

# 2. Virtual environment ------------------------------------------------------------------------
# The WebUIs pin setuptools 69.5.1, which torch 2.13 rejects (pip would then replace the CPU torch
# by a CUDA build); the constraints hold torch, torchvision and setuptools. reForge lists a pydantic
# wheel from GitHub: the same version from the index works for the API.
T0=$SECONDS
CONSTRAINTS=$HOST/constraints.txt
REQS=$HOST/requirements.txt
printf '%s\n' torch==2.13.0+cpu torchvision==0.28.0 setuptools==80.9.0 >"$CONSTRAINTS"
case $VARIANT in
  neo) SRC_REQS=$ROOT/requirements.txt ;;
  *) SRC_REQS=$ROOT/requirements_versions.txt ;;
esac
sed -E -e 's/^setuptools==.*/setuptools==80.9.0/' \
  -e 's#^https://github\.com/Panchovix/pydantic-fixreforge/.*pydantic-([0-9.]+)-py3-none-any\.whl.*#pydantic==\1#' \
  "$SRC_REQS" >"$REQS"
! grep -n -E '^(https?|git)[:+]' "$REQS" || die "a requirement still points outside the package index"

VENV=$HOST/venv
VPY=$VENV/bin/python
[[ -x $VPY ]] || { log "creating the venv with $PY ($("$PY" --version))"; "$PY" -m venv "$VENV"; }
# pip: quiet, without the index's "Location ... is ignored" noise (one line per package name).
pip_c() {
  "$VPY" -m pip install -q -c "$CONSTRAINTS" "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
}
STAMP=$VENV/.setup_forge-installed
WANT=$(cat "$CONSTRAINTS" "$REQS" <("$VPY" --version) <(echo "$VARIANT $CLIP_COMMIT") | sha256sum | cut -c1-16)
if [[ -f $STAMP && $(cat "$STAMP") == "$WANT" ]]; then
  log "venv already has the requirements"
else
  rm -f "$STAMP"
  log "installing torch (local CPU wheel), setuptools, wheel"
  pip_c torch==2.13.0 setuptools==80.9.0 wheel
  case $VARIANT in
    neo)
      # requirements.txt pins Pillow 12.2 and gradio 4.40 wants pillow<11: one resolve is impossible.
      # Neo's own prepare_environment installs gradio first and the requirements after (pip only
      # warns); the same order here.
      log "installing gradio first (Neo's order)"
      pip_c gradio==4.40.0 gradio_rangeslider==0.0.8 packaging==26.0 torchvision==0.28.0
      log "installing requirements.txt"
      pip_c -r "$REQS" torchvision==0.28.0
      ;;
    forge|reforge)
      log "installing requirements_versions.txt"
      # joblib: Forge's built-in soft-inpainting script imports it (a start-up traceback without it).
      pip_c -r "$REQS" torchvision==0.28.0 $([[ $VARIANT == forge ]] && echo joblib)
      log "installing openai/CLIP as clip (the launcher would take it from GitHub)"
      pip_c --no-build-isolation "$HOST/src/CLIP"
      ;;
  esac
  echo "$WANT" >"$STAMP"
fi

# torchvision 0.28's fake-op registrations for nms/qnms lack the _has_ops() guard the others
# have, so `import torchvision` fails against the CPU torch: guard them.
TV_META=$("$VPY" -c 'import importlib.util as u, os; print(os.path.join(os.path.dirname(u.find_spec("torchvision").origin), "_meta_registrations.py"))')
if grep -q 'setup_forge: nms guard' "$TV_META"; then
  log "torchvision nms guard already in place"
else
  log "guarding the nms/qnms fake-op registrations in $TV_META"
  "$VPY" - "$TV_META" <<'EOF'
import re, sys

path = sys.argv[1]
text = open(path, encoding="utf-8").read()
decorator = re.compile(r'^@torch\.library\.register_fake\("torchvision::(nms|qnms)"\)$', re.M)
guarded, count = decorator.subn(
    lambda m: '@(torch.library.register_fake("torchvision::%s") if torchvision.extension._has_ops() '
              'else (lambda fn: fn))  # setup_forge: nms guard' % m.group(1), text)
if count != 2:
    sys.exit(f"expected the nms and qnms registrations, found {count}")
open(path, "w", encoding="utf-8").write(guarded)
EOF
fi
"$VPY" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)' >&2
log "venv ready ($((SECONDS - T0)) s)"

# 3. Live-preview VAE-approx files ----------------------------------------------------------------
# Forge (SDXL: vaeapprox-sdxl.pt) and reForge (SD1: model.pt) would download the missing one on the
# first image and fail offline (HTTP 500 URLError). Take the real file from the other WebUI's mirror
# when there is one, else copy the other file (same layout, approximate colours only).
APPROX=$ROOT/models/VAE-approx
mkdir -p "$APPROX"
[[ -f $APPROX/model.pt ]] ||
  blob lllyasviel+stable-diffusion-webui-forge "$FORGE_COMMIT" models/VAE-approx/model.pt "$APPROX/model.pt" ||
  { [[ -f $APPROX/vaeapprox-sdxl.pt ]] && cp "$APPROX/vaeapprox-sdxl.pt" "$APPROX/model.pt"; } || true
[[ -f $APPROX/vaeapprox-sdxl.pt ]] ||
  blob Panchovix+stable-diffusion-webui-reForge "$REFORGE_COMMIT" models/VAE-approx/vaeapprox-sdxl.pt "$APPROX/vaeapprox-sdxl.pt" ||
  { [[ -f $APPROX/model.pt ]] && cp "$APPROX/model.pt" "$APPROX/vaeapprox-sdxl.pt"; } || true
[[ -s $APPROX/model.pt && -s $APPROX/vaeapprox-sdxl.pt ]] || die "no VAE-approx files in $APPROX"

# 4. Checkpoints ------------------------------------------------------------------------------------
T0=$SECONDS
CKPT_DIR=$HOST/checkpoints
HF_HOME_DIR=$HOST/hf-home
mkdir -p "$CKPT_DIR" "$HF_HOME_DIR"
OFFLINE_ENV=(HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "HF_HOME=$HF_HOME_DIR" GRADIO_ANALYTICS_ENABLED=False)
# The builder runs with a scratch HF_HOME (transformers/diffusers write cache-version files there),
# so that hf-home/ is left empty for the WebUI.
BUILD_ENV=(HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "HF_HOME=$HOST/.build-hf-home")
NAMES=(forge-sd1 forge-sdxl)
if [[ $VARIANT == reforge ]]; then
  # reForge has no backend/ to build with; the files built for Neo or Forge fit (same shapes pinned).
  for name in "${NAMES[@]}"; do
    [[ -e $CKPT_DIR/$name.safetensors ]] && continue
    src=
    for other in neo forge; do
      [[ -f $TARGET/$other/checkpoints/$name.safetensors ]] && { src=$TARGET/$other/checkpoints/$name.safetensors; break; }
    done
    [[ -n $src ]] || die "$name.safetensors: set up neo or forge under $TARGET first (reforge links their checkpoints)"
    log "linking $src"
    ln -s "$src" "$CKPT_DIR/$name.safetensors"
  done
  log "checking that reForge's own detection takes them"
  (cd "$ROOT" && env "${BUILD_ENV[@]}" "$VPY" "$HERE/make_tiny_checkpoints.py" --check "$CKPT_DIR"/forge-*.safetensors)
else
  MISSING=()
  for name in "${NAMES[@]}"; do [[ -f $CKPT_DIR/$name.safetensors ]] || MISSING+=("$name"); done
  if [[ ${#MISSING[@]} -eq 0 ]]; then
    log "checkpoints already in $CKPT_DIR"
  else
    log "building ${MISSING[*]} in $CKPT_DIR"
    (cd "$ROOT" && env "${BUILD_ENV[@]}" "$VPY" "$HERE/make_tiny_checkpoints.py" --out "$CKPT_DIR" --only "${MISSING[@]}")
  fi
fi
rm -rf "$HOST/.build-hf-home"
log "checkpoints ready ($((SECONDS - T0)) s)"

# 5. host.env --------------------------------------------------------------------------------------
FLAGS=(--skip-prepare-environment --skip-python-version-check --skip-torch-cuda-test --skip-version-check)
case $VARIANT in
  neo) FLAGS+=(--cpu --ckpt-dirs "$CKPT_DIR") ;;   # Neo: no --ckpt-dir/--ckpt; picks the first model itself
  *) FLAGS+=(--always-cpu --no-download-sd-model --ckpt-dir "$CKPT_DIR") ;;
esac
{
  echo "# Forge-family test host, written by tests/forge/setup_forge.sh $VARIANT on $(date -u +%Y-%m-%dT%H:%MZ)."
  echo "# source it, then: cd \"\$ROOT\" && env \"\${ENV[@]}\" \"\$PYTHON\" launch.py \"\${FLAGS[@]}\" --api --nowebui --server-name 127.0.0.1 --port PORT"
  printf 'VARIANT=%q\n' "$VARIANT"
  printf 'ROOT=%q\n' "$ROOT"
  printf 'PYTHON=%q\n' "$VPY"
  printf 'CKPT_DIR=%q\n' "$CKPT_DIR"
  printf 'SD1_CKPT=%q\n' forge-sd1.safetensors
  printf 'SDXL_CKPT=%q\n' forge-sdxl.safetensors
  printf 'HF_HOME_DIR=%q\n' "$HF_HOME_DIR"
  printf 'ENV=(%s)\n' "$(printf '%q ' "${OFFLINE_ENV[@]}" | sed 's/ $//')"
  printf 'FLAGS=(%s)\n' "$(printf '%q ' "${FLAGS[@]}" | sed 's/ $//')"
} >"$HOST/host.env"

# 6. Final checks --------------------------------------------------------------------------------
"$VPY" -c 'import sys, torch; v = torch.__version__; sys.exit(0 if v.endswith("+cpu") else f"torch is not the CPU build: {v}")' ||
  die "pip replaced the CPU torch"
[[ -z $(ls -A "$HF_HOME_DIR") ]] || log "note: $HF_HOME_DIR is not empty"
log "done in $((SECONDS - START)) s: $HOST/host.env"
cat "$HOST/host.env"
