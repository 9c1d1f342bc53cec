#!/usr/bin/env bash
# Prepare a real AUTOMATIC1111 v1.10.1 for the A1111 integration tests, offline (about an hour,
# most of it pip). Step 1 (the sources) is done by hand or with a fetch tool; this does the rest.
#
# 1. Sources, outside this repository (never commit them):
#    - A1111: the fork kklouzal/stable-diffusion-webui carries upstream; its commit 82a973c0 is
#      upstream v1.10.1. Its repositories/ at the commits launch_utils.py pins:
#        repositories/stable-diffusion-stability-ai  Stability-AI/stablediffusion    cf1d67a6fd5ea1aa600c4df58e5b47da45f6bdbf
#        repositories/generative-models             Stability-AI/generative-models  45c443b316737a4ab6e40413d7794a7f5657c19f
#        repositories/k-diffusion                   crowsonkb/k-diffusion           ab527a9a6d347f364e3d185ba6d714e22d80cb3c
#        repositories/BLIP                          salesforce/BLIP                 48211a1594f1321b00f14c9f7a5b4813144b2fb9
#        repositories/stable-diffusion-webui-assets AUTOMATIC1111/stable-diffusion-webui-assets 6f7db241d2f8ba7457bac5ca9753331f0c266917
#    - openai/CLIP at d50d76daa670286dd6cacf3bcd80b5e4823fc8e1 (anywhere; pip-installed below).
#    From bare git snapshots with missing (image) blobs, extract_snapshot.py writes a commit out
#    blob by blob:  python tests/integration/extract_snapshot.py BARE_GIT_DIR COMMIT DEST
#
# 2. This script:  tests/integration/build_a1111.sh A1111_PATH CLIP_SRC VENV [COMFYUI_PATH]
#    - VENV: a Python 3.11 venv with A1111's requirements_versions.txt. Two changes were needed
#      here: setuptools==69.5.1 is dropped (torch 2.13 needs >= 77; 80.x keeps pkg_resources),
#      and torch is the PyPI build (CUDA libraries, runs on CPU) so that PyPI's torchvision loads;
#      a CPU-only torch from another index with PyPI's torchvision fails ("torchvision::nms does
#      not exist").
#    - CLIP: pip install --no-deps --no-build-isolation (its setup.py imports pkg_resources).
#    - the local Hugging Face cache for openai/clip-vit-large-patch14 (hf_clip_cache.py) in
#      $A1111_PATH/seqlora-hf-home (the tests use it unless HF_HOME is set).
#    - a random-weight SD-1.5 checkpoint in the original key format,
#      models/Stable-diffusion/seqlora-sd15-random.safetensors, written by make_sd15_checkpoint.py
#      with ComfyUI's converters (COMFYUI_PATH, a ComfyUI checkout), run by CKPT_PYTHON: a Python
#      with ComfyUI's requirements and diffusers (the ComfyUI tests' Python).
#
# 3. Run the tests with this project's Python:
#    A1111_PATH=… A1111_PYTHON=VENV/bin/python .venv/bin/python -m pytest tests/integration/a1111
set -euo pipefail

A1111_PATH=$(realpath "$1")
CLIP_SRC=$(realpath "$2")
VENV=$3
COMFYUI_PATH=${4:-}
HERE=$(cd "$(dirname "$0")" && pwd)
TORCH=${TORCH:-torch==2.13.0}
TORCHVISION=${TORCHVISION:-torchvision==0.28.0}

test -f "$A1111_PATH/launch.py" || { echo "$A1111_PATH is not an A1111 checkout" >&2; exit 2; }
test -d "$A1111_PATH/repositories/stable-diffusion-stability-ai/ldm" || {
    echo "$A1111_PATH/repositories/ lacks stable-diffusion-stability-ai (step 1)" >&2; exit 2; }

if [ ! -x "$VENV/bin/python" ]; then
    python3.11 -m venv "$VENV"
fi
PY="$VENV/bin/python"
grep -v '^setuptools' "$A1111_PATH/requirements_versions.txt" > "$VENV/a1111-requirements.txt"
printf '%s\nsetuptools==80.9.0\n' "$TORCH" > "$VENV/a1111-constraints.txt"
# PyPI's torch (not a local CPU wheel from find-links): PyPI's torchvision is built against it
env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null "$PY" -m pip install "$TORCH" "$TORCHVISION" setuptools==80.9.0
"$PY" -m pip install -c "$VENV/a1111-constraints.txt" -r "$VENV/a1111-requirements.txt"
"$PY" -m pip install --no-deps --no-build-isolation "$CLIP_SRC"
"$PY" -c "import torch, torchvision, clip, open_clip, gradio; print('A1111 venv ok: torch', torch.__version__, 'gradio', gradio.__version__)"

"$PY" "$HERE/hf_clip_cache.py" "$A1111_PATH/seqlora-hf-home"

CKPT="$A1111_PATH/models/Stable-diffusion/seqlora-sd15-random.safetensors"
if [ ! -f "$CKPT" ]; then
    # the same checkpoint maker as the ComfyUI tests: a Python with ComfyUI's requirements and
    # this project's (diffusers), e.g. the one the ComfyUI integration tests run with
    test -n "$COMFYUI_PATH" || { echo "no $CKPT: pass COMFYUI_PATH (a ComfyUI checkout) to write it" >&2; exit 2; }
    "${CKPT_PYTHON:?set CKPT_PYTHON to a Python with ComfyUI requirements and diffusers}" \
        "$HERE/make_sd15_checkpoint.py" "$COMFYUI_PATH" "$CKPT" --dtype fp16
fi
echo "A1111 ready: A1111_PATH=$A1111_PATH A1111_PYTHON=$PY"
