#!/usr/bin/env bash
# Sets up everything on a fresh Debian/Ubuntu machine: system libraries for napari's OpenGL canvas
# under a virtual X server, a virtual environment in .venv, torch (CPU is enough), sam2, and this
# package with its test and docs extras. Safe to run again: finished steps are skipped quickly
# (the package itself is reinstalled only when pyproject.toml changed).
set -euo pipefail
cd "$(dirname "$0")/.."

SYSTEM_PACKAGES="xvfb xauth libgl1-mesa-dri libegl1 libopengl0 libxkbcommon-x11-0 libxcb-icccm4
  libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0
  libxcb-shape0 libxcb-cursor0 libfontconfig1 libdbus-1-3"
missing=$(for p in $SYSTEM_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
if [ -n "$missing" ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "== installing system packages: $(echo $missing)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -c "import torch, torchvision" 2>/dev/null || {
  echo "== installing torch"
  pip install -q "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}"
}
# sam2's build imports torch, so it is built against the torch above, without CUDA extensions.
python -c "import sam2" 2>/dev/null || {
  echo "== installing sam2"
  SAM2_BUILD_CUDA=0 pip install -q --no-build-isolation "sam2==1.1.0"
}
# The editable install only needs redoing when pyproject.toml (dependencies, entry points,
# packages) changes or the venv was moved: a stamp records the hash it was installed with.
STAMP=.venv/.hrmedseg-install-stamp
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $(pwd)"
if [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ] && python -c "import hrmedseg, napari_hrmedseg" 2>/dev/null; then
  echo "== napari-hrmedseg is installed and up to date"
else
  echo "== installing napari-hrmedseg"
  pip install -q -e ".[testing,docs]"
  echo "$want" > "$STAMP"
fi
