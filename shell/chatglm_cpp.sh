#!/usr/bin/env bash
# Install chatglm-cpp 0.4.2 (li-plus/chatglm.cpp's Python package) into its own venv, for the export tests
# (tests/test_export_chatglm_cpp.py) and bench/cpp_compare.py. It is a separate venv because the package is an
# sdist that compiles a C++ extension and pins nothing glmtune needs; glmtune itself never imports it.
#   bash shell/chatglm_cpp.sh            # venv at $GLMTUNE_CHATGLM_CPP_VENV, default ~/.cache/glmtune/cpp-venv
# Prints the venv's python last (what GLMTUNE_CHATGLM_CPP_PYTHON should be). Reuses a venv that already has
# 0.4.2, and pip's wheel cache reuses a wheel built before, so only the first build takes long.
set -euo pipefail
PY=${PYTHON:-python3}
VENV=${GLMTUNE_CHATGLM_CPP_VENV:-$HOME/.cache/glmtune/cpp-venv}
VERSION=0.4.2
have() { [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c "import chatglm_cpp, sys; sys.exit(chatglm_cpp.__version__ != '$VERSION')" 2>/dev/null; }
if ! have; then
  [[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
  if ! "$VENV/bin/python" -m pip wheel --help >/dev/null 2>&1 || ! ls "$("$VENV/bin/python" -m pip cache dir 2>/dev/null)"/wheels/*/*/*/*/chatglm_cpp-$VERSION-*.whl >/dev/null 2>&1; then
    echo "building chatglm-cpp $VERSION from source: this may take ~20 minutes (once; pip caches the wheel)" >&2
  fi
  # The policy flag: its bundled sentencepiece declares a CMake minimum that the CMake pip brings in refuses.
  CMAKE_ARGS="${CMAKE_ARGS:-} -DCMAKE_POLICY_VERSION_MINIMUM=3.5" "$VENV/bin/python" -m pip install -q "chatglm-cpp==$VERSION" >&2
  have || { echo "error: chatglm-cpp $VERSION did not install into $VENV" >&2; exit 1; }
fi
echo "$VENV/bin/python"
