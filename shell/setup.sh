#!/usr/bin/env bash
# Install glmtune and its requirements into the current Python (a venv is recommended). Python packages only:
# nothing is installed outside that Python (the browser for the serving page's test is shell/setup_browser.sh).
# torch is pinned to 2.13.0, the CPU wheel available on this project's machines; to use a GPU,
# install your CUDA build of torch (2.4 – 2.14) first and this step keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if "$PY" -c "import torch" 2>/dev/null; then
  grep -v '^torch==' requirements.txt > /tmp/glmtune-req.txt
  "$PY" -m pip install -q -r /tmp/glmtune-req.txt
else
  "$PY" -m pip install -q -r requirements.txt
fi
"$PY" -m pip install -q --no-deps -e .
# int4 on x86 CPUs with AVX2: glmtune's own kernel (glmtune/model/native.py), compiled once into
# ~/.cache/glmtune/kernels. Without a C++ compiler this prints why and int4 uses torch's kernels.
"$PY" -m glmtune.model.native build || true
