#!/usr/bin/env bash
# Install leanconv and run its demo: train a Fashion-MNIST teacher (cached), convert, calibrate,
# fine-tune, report. Arguments go to `leanconv demo` (e.g. --quick, --out DIR, --recipe NAME).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh all   # + onnxruntime (the report also times the exported networks) and matplotlib (report.png)
exec leanconv demo "$@"
