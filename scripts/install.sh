#!/usr/bin/env bash
# Install leanconv (editable, with the given extras) and what it needs around it: torch and
# torchvision when missing, and Debian's Fashion-MNIST package when it is missing and apt can get it.
#   scripts/install.sh            # core
#   scripts/install.sh test       # + the test extra
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install --quiet --disable-pip-version-check"

if ! python -c "import torch, torchvision" 2>/dev/null; then
  echo "installing torch and torchvision"
  $PIP torch==2.14.1 torchvision==0.29.1
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
