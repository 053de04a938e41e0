#!/usr/bin/env bash
# Install glmtune and its requirements into the current Python (a venv is recommended).
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

# The serving page's browser test (tests/test_serve_api.py) drives Debian's headless Chromium through
# chromedriver. Installed only when missing, and only as root on a Debian/Ubuntu system; otherwise the
# test is skipped outside CI and fails in CI (CI=true). The CJK font only makes the screenshot legible.
if [[ ! -x /usr/bin/chromedriver && "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver fonts-wqy-microhei \
    || echo "warning: could not install chromium/chromium-driver: the browser test cannot run" >&2
fi
