#!/usr/bin/env bash
# Set up, then run the default test suite (CPU; slow and GPU tests are opt-in: -m slow, -m gpu).
#   GLMTUNE_INSTALL_BROWSER=1 bash shell/test.sh             # also apt-get Chromium for the browser test (root)
#   bash shell/test.sh [pytest args]                         # with the transformers already installed
#   TRANSFORMERS_VERSION=floor  bash shell/test.sh           # on the lowest supported release (setup.cfg's floor)
#   TRANSFORMERS_VERSION=newest bash shell/test.sh           # on the newest 5.x release
#   TRANSFORMERS_VERSION=5.25.0 bash shell/test.sh           # on one given release
# With TRANSFORMERS_VERSION the suite runs in a throwaway venv .venv-transformers-<version>/ made with
# --system-site-packages: torch and the other requirements come from this Python, only transformers (and
# glmtune, editable) are installed into it, so the current environment is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ -n "${TRANSFORMERS_VERSION:-}" ]]; then
  case "$TRANSFORMERS_VERSION" in
    floor)  spec="transformers==$(sed -n 's/^ *transformers>=\([0-9.]*\).*/\1/p' setup.cfg)" ;;
    newest) spec="transformers<6" ;;
    *)      spec="transformers==$TRANSFORMERS_VERSION" ;;
  esac
  venv=".venv-transformers-$TRANSFORMERS_VERSION"
  # --without-pip: this Python's own pip and setuptools serve the venv too (a venv's bundled setuptools may be
  # too old to build glmtune), and nothing but transformers and glmtune lands in it.
  [[ -x "$venv/bin/python" ]] || "$PY" -m venv --system-site-packages --without-pip "$venv"
  # --no-deps: the other requirements come from this Python; a new hard dependency of that release which
  # the package index lacks (5.25 declares `kernels`, used lazily) is listed by `pip check`, not fatal.
  "$venv/bin/python" -m pip install -q --no-deps --upgrade "$spec"
  "$venv/bin/python" -m pip check 2>/dev/null | grep -i '^transformers' || true
  PY="$venv/bin/python"
  echo "testing with $("$PY" -c 'import transformers; print("transformers", transformers.__version__)')"
fi
PYTHON="$PY" bash shell/setup.sh
# The serving page's browser test needs Chromium, a system package: installed only when asked for.
if [[ "${GLMTUNE_INSTALL_BROWSER:-}" == 1 ]]; then
  bash shell/setup_browser.sh
elif [[ ! -x /usr/bin/chromedriver ]]; then
  echo "note: no /usr/bin/chromedriver: the serving page's browser test is skipped" \
       "(GLMTUNE_INSTALL_BROWSER=1 installs Chromium with apt-get, system-wide)" >&2
fi
exec "$PY" -m pytest -q "$@"
