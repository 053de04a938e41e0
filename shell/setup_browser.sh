#!/usr/bin/env bash
# System packages for the serving page's browser test (tests/test_serve_api.py): Debian's headless Chromium,
# its chromedriver and a CJK font (only so the screenshot is legible). Installed with apt-get, system-wide, so
# only when asked: shell/test.sh runs this with GLMTUNE_INSTALL_BROWSER=1 (.ci/run sets it). Without the browser
# the test is skipped, except in CI (CI=true), where it fails.
set -euo pipefail
if [[ -x /usr/bin/chromedriver ]]; then
  exit 0
fi
packages="chromium chromium-driver fonts-wqy-microhei"
if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null; then
  echo "setup_browser: not root on a Debian/Ubuntu system; install $packages yourself (the browser test is skipped until then)" >&2
  exit 0
fi
echo "setup_browser: installing system packages with apt-get for the browser test: $packages (and their dependencies)" >&2
apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $packages \
  || echo "warning: could not install $packages: the browser test cannot run" >&2
