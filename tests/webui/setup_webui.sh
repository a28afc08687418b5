#!/usr/bin/env bash
# Prepare an offline, CPU-only AUTOMATIC1111 Stable Diffusion WebUI v1.10.1 for integration tests.
#
# Usage:
#   setup_webui.sh --mirrors DIR --target DIR [--webui DIR] [--python PY] [--port N]
#
#   --mirrors DIR  folder holding bare git copies of the source repositories, one per
#                  repository, named OWNER+NAME/repo (or OWNER+NAME, OWNER+NAME.git), e.g.
#                  DIR/kklouzal+stable-diffusion-webui/repo. Looked up (first found wins):
#                    WebUI               kklouzal|avilaops|AUTOMATIC1111 + stable-diffusion-webui
#                    assets              AUTOMATIC1111+stable-diffusion-webui-assets
#                    ldm                 Stability-AI|w-e-w + stablediffusion
#                    sgm                 Stability-AI+generative-models
#                    k-diffusion         crowsonkb+k-diffusion
#                    BLIP                salesforce+BLIP
#                    CLIP                openai+CLIP
#                  Each can be overridden with a git dir in WEBUI_GIT, ASSETS_GIT, LDM_GIT,
#                  SGM_GIT, KDIFF_GIT, BLIP_GIT, CLIP_GIT.
#   --target DIR   where everything goes:
#                    DIR/stable-diffusion-webui   WebUI checkout (with repositories/)
#                    DIR/src/CLIP                 openai/CLIP checkout (installed as `clip`)
#                    DIR/venv                     the WebUI's own virtual environment
#                    DIR/constraints.txt          pins that keep pip on the CPU torch
#                    DIR/hf-home                  offline HF cache (CLIP-L tokenizer + config)
#                    DIR/checkpoints              tiny-sd1/tiny-sdxl/tiny-sd2v (SD2, v-prediction)
#                                                 .safetensors + .yaml
#   --webui DIR    use this existing WebUI checkout instead of cloning one; its
#                  repositories/ (and TARGET/src/CLIP) are filled in from --mirrors where
#                  missing, and left alone where already at the pinned commits.
#   --python PY    interpreter for the venv (default: python3.11, else python3).
#   --port N       port printed in the launch command (default 7861).
#
# Everything is taken from the local mirrors and the configured package index; nothing
# is downloaded from GitHub or Hugging Face. Re-running skips what is already in place.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MIRRORS= TARGET= WEBUI= PY= PORT=7861
while [[ $# -gt 0 ]]; do
  case "$1" in
    --mirrors) MIRRORS=$2; shift 2 ;;
    --target) TARGET=$2; shift 2 ;;
    --webui) WEBUI=$2; shift 2 ;;
    --python) PY=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
[[ -n "$TARGET" ]] || { echo "--target is required" >&2; exit 2; }
[[ -n "$MIRRORS" || -n "$WEBUI" ]] || { echo "--mirrors or --webui is required" >&2; exit 2; }
mkdir -p "$TARGET"
TARGET=$(cd "$TARGET" && pwd)
PY=${PY:-$(command -v python3.11 || command -v python3)}

# Pinned commits (modules/launch_utils.py of v1.10.1).
WEBUI_COMMIT=82a973c04367123ae98bd9abdf80d9eda9b910e2
ASSETS_COMMIT=6f7db241d2f8ba7457bac5ca9753331f0c266917
LDM_COMMIT=cf1d67a6fd5ea1aa600c4df58e5b47da45f6bdbf
SGM_COMMIT=45c443b316737a4ab6e40413d7794a7f5657c19f
KDIFF_COMMIT=ab527a9a6d347f364e3d185ba6d714e22d80cb3c
BLIP_COMMIT=48211a1594f1321b00f14c9f7a5b4813144b2fb9
CLIP_COMMIT=d50d76daa670286dd6cacf3bcd80b5e4823fc8e1

log() { echo "[setup_webui] $*" >&2; }

# find_mirror VAR_OVERRIDE NAME... : print the first existing git dir among the candidates.
find_mirror() {
  local override=$1; shift
  if [[ -n "$override" ]]; then echo "$override"; return; fi
  local name d
  for name in "$@"; do
    for d in "$MIRRORS/$name/repo" "$MIRRORS/$name/.git" "$MIRRORS/$name.git" "$MIRRORS/$name"; do
      if [[ -n "$MIRRORS" && -f "$d/HEAD" && -d "$d/objects" ]]; then echo "$d"; return; fi
    done
  done
  echo "no mirror found for: $*" >&2
  return 1
}

# checkout SRC_GIT_DIR COMMIT DEST : clone at COMMIT; paths whose blobs the mirror lacks
# (some copies omit large images) are left out with a sparse checkout.
checkout() {
  local src=$1 commit=$2 dest=$3
  if [[ -d "$dest/.git" ]] && [[ "$(git -C "$dest" rev-parse HEAD 2>/dev/null)" == "$commit" ]]; then
    log "$dest already at ${commit:0:8}"; return
  fi
  [[ ! -e "$dest" ]] || { echo "$dest exists but is not at $commit; remove it first" >&2; exit 1; }
  log "checking out ${commit:0:8} from $src into $dest"
  git clone -q --no-checkout "$src" "$dest"
  local missing
  missing=$(git -C "$dest" ls-tree -r "$commit" | while read -r _ type hash path; do
    [[ "$type" == blob ]] && ! git -C "$dest" cat-file -e "$hash" 2>/dev/null && echo "!/$path"
  done || true)
  if [[ -n "$missing" ]]; then
    log "leaving out blobs the mirror lacks: $(echo "$missing" | tr '\n' ' ')"
    # shellcheck disable=SC2086
    git -C "$dest" sparse-checkout set --no-cone '/*' $missing 2>/dev/null
  fi
  # With blobs left out, git reports "invalid object" for them while writing the index;
  # the checkout itself succeeds, so only those lines are dropped.
  local err
  err=$(git -C "$dest" -c advice.detachedHead=false checkout -q "$commit" 2>&1) || { echo "$err" >&2; exit 1; }
  grep -v '^error: invalid object' <<<"$err" >&2 || true
}

# 1. Sources ------------------------------------------------------------------------------
if [[ -n "$WEBUI" ]]; then
  ROOT=$(cd "$WEBUI" && pwd)
else
  ROOT=$TARGET/stable-diffusion-webui
  checkout "$(find_mirror "${WEBUI_GIT:-}" kklouzal+stable-diffusion-webui \
    avilaops+stable-diffusion-webui AUTOMATIC1111+stable-diffusion-webui)" "$WEBUI_COMMIT" "$ROOT"
fi
mkdir -p "$ROOT/repositories"
checkout "$(find_mirror "${ASSETS_GIT:-}" AUTOMATIC1111+stable-diffusion-webui-assets)" \
  "$ASSETS_COMMIT" "$ROOT/repositories/stable-diffusion-webui-assets"
checkout "$(find_mirror "${LDM_GIT:-}" Stability-AI+stablediffusion w-e-w+stablediffusion)" \
  "$LDM_COMMIT" "$ROOT/repositories/stable-diffusion-stability-ai"
checkout "$(find_mirror "${SGM_GIT:-}" Stability-AI+generative-models)" \
  "$SGM_COMMIT" "$ROOT/repositories/generative-models"
checkout "$(find_mirror "${KDIFF_GIT:-}" crowsonkb+k-diffusion)" \
  "$KDIFF_COMMIT" "$ROOT/repositories/k-diffusion"
checkout "$(find_mirror "${BLIP_GIT:-}" salesforce+BLIP)" "$BLIP_COMMIT" "$ROOT/repositories/BLIP"
mkdir -p "$TARGET/src"
checkout "$(find_mirror "${CLIP_GIT:-}" openai+CLIP)" "$CLIP_COMMIT" "$TARGET/src/CLIP"

# 2. Virtual environment --------------------------------------------------------------------
# The WebUI pins setuptools==69.5.1, which torch 2.13 rejects; pip would then swap the CPU
# torch for a CUDA build. The constraints keep torch, torchvision and setuptools fixed.
CONSTRAINTS=$TARGET/constraints.txt
cat >"$CONSTRAINTS" <<'EOF'
torch==2.13.0+cpu
torchvision==0.28.0
setuptools==80.9.0
EOF
VENV=$TARGET/venv
VPY=$VENV/bin/python
[[ -x "$VPY" ]] || { log "creating venv with $PY"; "$PY" -m venv "$VENV"; }
pip_c() { "$VPY" -m pip install -q -c "$CONSTRAINTS" "$@"; }
log "installing torch (local CPU wheel), setuptools, wheel"
pip_c torch==2.13.0 setuptools==80.9.0 wheel
log "installing the WebUI requirements"
sed -E 's/^setuptools==.*/setuptools==80.9.0/' "$ROOT/requirements_versions.txt" >"$TARGET/requirements.txt"
pip_c -r "$TARGET/requirements.txt" torchvision==0.28.0
log "installing openai/CLIP as the clip package"
pip_c --no-build-isolation "$TARGET/src/CLIP"
"$VPY" -c 'import torch, sys; v = torch.__version__; sys.exit(0 if v.endswith("+cpu") else f"not the CPU torch: {v}")'

# torchvision's fake-op registrations for nms/qnms are not guarded by _has_ops() like the
# others, so `import torchvision` fails against the CPU torch; guard them.
TV_META=$("$VPY" -c 'import importlib.util as u, os; print(os.path.join(os.path.dirname(u.find_spec("torchvision").origin), "_meta_registrations.py"))')
if ! grep -q 'webui-offline nms guard' "$TV_META"; then
  log "guarding nms/qnms meta registrations in $TV_META"
  "$VPY" - "$TV_META" <<'EOF'
import re, sys
path = sys.argv[1]
src = open(path).read()
# Decorated functions registered as fake ops for nms / qnms.
pattern = re.compile(r'^@torch\.library\.register_fake\("torchvision::(nms|qnms)"\)\n', re.M)
count = 0
def guard(m):
    global count
    count += 1
    return f'@(lambda f: f) if not torchvision.extension._has_ops() else torch.library.register_fake("torchvision::{m.group(1)}")  # webui-offline nms guard\n'
src = pattern.sub(guard, src)
if count == 0:
    sys.exit("no nms/qnms registration found to guard")
open(path, "w").write(src)
EOF
fi
"$VPY" -c 'import torchvision; print("torchvision", torchvision.__version__)'

# 3. Offline Hugging Face cache for openai/clip-vit-large-patch14 (tokenizer + config) -------
HF_HOME_DIR=$TARGET/hf-home
log "writing the offline HF cache in $HF_HOME_DIR"
"$VPY" - "$HF_HOME_DIR" <<'EOF'
import gzip, hashlib, json, os, sys
import open_clip.tokenizer
from transformers.models.clip.tokenization_clip import bytes_to_unicode

repo = os.path.join(sys.argv[1], "hub", "models--openai--clip-vit-large-patch14")
# The BPE file bundled with open_clip is the one CLIP was trained with: a header line, then
# merges; CLIP uses the first 49152 - 256 - 2 of them.
lines = gzip.open(open_clip.tokenizer.default_bpe()).read().decode("utf-8").split("\n")
merges = lines[1:49152 - 256 - 2 + 1]
symbols = list(bytes_to_unicode().values())
vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
vocab += ["<|startoftext|>", "<|endoftext|>"]
assert len(vocab) == 49408, len(vocab)

bos, eos = "<|startoftext|>", "<|endoftext|>"
text_config = dict(
    model_type="clip_text_model", vocab_size=49408, hidden_size=768, intermediate_size=3072,
    projection_dim=768, num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
    hidden_act="quick_gelu", layer_norm_eps=1e-5, attention_dropout=0.0, dropout=0.0,
    initializer_range=0.02, initializer_factor=1.0, bos_token_id=0, eos_token_id=2, pad_token_id=1)
vision_config = dict(
    model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, projection_dim=768,
    num_hidden_layers=24, num_attention_heads=16, image_size=224, patch_size=14,
    hidden_act="quick_gelu", layer_norm_eps=1e-5)
files = {
    "vocab.json": json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False),
    "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
    "special_tokens_map.json": json.dumps(
        {"bos_token": bos, "eos_token": eos, "unk_token": eos, "pad_token": eos}),
    "tokenizer_config.json": json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "bos_token": bos, "eos_token": eos, "unk_token": eos,
         "pad_token": eos, "model_max_length": 77, "do_lower_case": True, "errors": "replace",
         "add_prefix_space": False}),
    "config.json": json.dumps(
        {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 768,
         "logit_scale_init_value": 2.6592, "text_config": text_config,
         "vision_config": vision_config}, indent=2),
}
revision = hashlib.sha1("".join(files.values()).encode()).hexdigest()
snapshot = os.path.join(repo, "snapshots", revision)
os.makedirs(snapshot, exist_ok=True)
os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
for name, text in files.items():
    with open(os.path.join(snapshot, name), "w", encoding="utf-8") as f:
        f.write(text)
with open(os.path.join(repo, "refs", "main"), "w") as f:
    f.write(revision)
# Tells transformers the cache layout is current (else it warns about migrating it offline).
with open(os.path.join(sys.argv[1], "hub", "version.txt"), "w") as f:
    f.write("1")
print("HF cache snapshot", snapshot)
EOF

# 4. Tiny random-weight checkpoints -----------------------------------------------------------
CKPT_DIR=$TARGET/checkpoints
# Only the missing ones are built (each has its own seed, so a subset matches a full build).
MISSING=()
for name in tiny-sd1 tiny-sdxl tiny-sd2v; do
  [[ -f "$CKPT_DIR/$name.safetensors" && -f "$CKPT_DIR/$name.yaml" ]] || MISSING+=("$name")
done
if [[ ${#MISSING[@]} -eq 0 ]]; then
  log "tiny checkpoints already in $CKPT_DIR"
else
  log "building tiny checkpoints in $CKPT_DIR: ${MISSING[*]}"
  (cd "$ROOT" && HF_HOME=$HF_HOME_DIR HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    "$VPY" "$HERE/make_tiny_checkpoints.py" --out "$CKPT_DIR" --only "${MISSING[@]}")
fi
# SDXL live previews want this file and would download it; the SD1 one has the same layout.
mkdir -p "$ROOT/models/VAE-approx"
[[ -f "$ROOT/models/VAE-approx/vaeapprox-sdxl.pt" ]] ||
  cp "$ROOT/models/VAE-approx/model.pt" "$ROOT/models/VAE-approx/vaeapprox-sdxl.pt"

# 4b. The export tab's packages (export/requirements-webui.txt, what its install button installs),
# kept beside the venv so the venv stays as the WebUI made it: run_live_tests.sh puts this folder
# on PYTHONPATH. --no-deps, plus onnxruntime's small dependencies, so numpy/torch stay the venv's.
if [[ -d $TARGET/export-packages/onnxruntime ]]; then
  log "export packages already in $TARGET/export-packages"
else
  log "installing the export packages into $TARGET/export-packages"
  "$VPY" -m pip install -q --target "$TARGET/export-packages" --no-deps -r "$HERE/../../export/requirements-webui.txt" \
    flatbuffers coloredlogs humanfriendly
fi

# 5. Launch command -------------------------------------------------------------------------
cat <<EOF

WebUI ready in $ROOT. Launch (API only; drop --nowebui for the Gradio UI as well):

cd $ROOT && HF_HOME=$HF_HOME_DIR HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \\
  $VPY launch.py --nowebui --api --skip-prepare-environment --skip-torch-cuda-test \\
  --skip-python-version-check --skip-version-check --no-download-sd-model --use-cpu all \\
  --no-half --precision full --server-name 127.0.0.1 --port $PORT \\
  --ckpt-dir $CKPT_DIR --ckpt $CKPT_DIR/tiny-sd1.safetensors
EOF
