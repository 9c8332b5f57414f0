#!/bin/sh
# Make sure Debian's chromium and chromium-driver are installed: the dashboard's end-to-end
# test (tests/test_ui.py) drives /usr/bin/chromium through /usr/bin/chromedriver.
#
#   scripts/ensure_chromium.sh        # `make install` runs it
#
# Present: exits at once, silently. Missing and root on Debian: installs them with apt-get
# (non-interactive, quiet). Otherwise: says what to run, and exits 0 so that the rest of the
# install goes on; the UI test then fails with the same instructions.
set -eu

missing=""
[ -x /usr/bin/chromium ] || missing="$missing chromium"
[ -x /usr/bin/chromedriver ] || missing="$missing chromium-driver"
[ -z "$missing" ] && exit 0

hint="install them with: sudo apt-get install$missing"

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_chromium: missing:$missing, and this is not a Debian system (no apt-get)." >&2
    echo "ensure_chromium: the UI test expects /usr/bin/chromium and /usr/bin/chromedriver;" \
        "install Chromium and its matching ChromeDriver there." >&2
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "ensure_chromium: missing:$missing (needed by tests/test_ui.py); $hint" >&2
    exit 0
fi

echo "ensure_chromium: installing$missing with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
# shellcheck disable=SC2086  # $missing is a list of package names
if ! apt-get install -y -qq --no-install-recommends $missing >/dev/null 2>&1; then
    # A fresh container has no package lists yet.
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    echo "ensure_chromium: apt-get ran but /usr/bin/chromium or /usr/bin/chromedriver is" \
        "still missing; $hint" >&2
    exit 1
fi
echo "ensure_chromium: $(/usr/bin/chromedriver --version 2>/dev/null | head -n 1)" >&2
