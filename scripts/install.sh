#!/usr/bin/env bash
# Install leanconv (editable, with the given extras) and what it needs around it: torch and
# torchvision when missing, and Debian's Fashion-MNIST package when it is missing and apt can get it.
#   scripts/install.sh            # core
#   scripts/install.sh test       # + the test extra
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install --quiet --disable-pip-version-check"

TORCH="torch==2.14.1 torchvision==0.29.1"
CPU_INDEX=https://download.pytorch.org/whl/cpu
if ! python -c "import torch, torchvision" 2>/dev/null; then
  # Without an NVIDIA GPU, PyTorch's CPU wheels (~1 GB installed) instead of PyPI's default CUDA
  # build (~5.5 GB, 3 GB of it nvidia-* libraries); LEANCONV_TORCH_INDEX=default keeps PyPI's.
  if [ "${LEANCONV_TORCH_INDEX:-auto}" != default ] && ! command -v nvidia-smi >/dev/null \
     && curl -sfI --max-time 5 "$CPU_INDEX/torch/" >/dev/null 2>&1; then
    echo "installing torch and torchvision, CPU build (no NVIDIA GPU here), from $CPU_INDEX"
    $PIP --index-url "$CPU_INDEX" $TORCH || { echo "the CPU index failed; installing from the default index"; $PIP $TORCH; }
  else
    echo "installing torch and torchvision"
    $PIP $TORCH
  fi
fi
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "installing Debian's dataset-fashion-mnist"
    (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null
  else
    echo "note: Fashion-MNIST is not installed; as root: apt-get install dataset-fashion-mnist" \
         "(or pass --data fashion-mnist:DIR, or let torchvision download it when online)"
  fi
fi
$PIP -e ".${1:+[$1]}"
