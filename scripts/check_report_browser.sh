#!/usr/bin/env bash
# Render a report HTML page in headless Chromium (Debian's `chromium`) and save a PNG screenshot, so a person (or
# CI) can see that the page renders. No network is used: the page is self-contained.
#   usage: scripts/check_report_browser.sh REPORT.html [SCREENSHOT.png] [WIDTH,HEIGHT]
# Exit status: 0 when the screenshot was written and is non-trivial, 1 otherwise, 2 on bad usage.
set -euo pipefail

if [[ $# -lt 1 || ! -f "$1" ]]; then
    echo "usage: $0 REPORT.html [SCREENSHOT.png] [WIDTH,HEIGHT]" >&2
    exit 2
fi
report="$(realpath "$1")"
shot="$(realpath -m "${2:-${report%.html}.png}")"
size="${3:-1280,4000}"

browser="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
if [[ -z "$browser" ]]; then
    echo "no chromium found: install it with 'apt-get install -y chromium'" >&2
    exit 1
fi
if grep -Eq '(src|href)="(https?:)?//' "$report"; then
    echo "$report references external URLs; the report must be self-contained" >&2
    exit 1
fi

profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
rm -f "$shot"
timeout 120 "$browser" --headless --no-sandbox --disable-gpu --disable-background-networking \
    --disable-component-update --disable-sync --no-first-run --user-data-dir="$profile" \
    --hide-scrollbars --screenshot="$shot" --window-size="$size" "file://$report" >/dev/null 2>&1 || true

if [[ ! -s "$shot" ]] || [[ "$(stat -c %s "$shot")" -lt 20000 ]]; then
    echo "chromium did not produce a screenshot of $report (see $shot)" >&2
    exit 1
fi
echo "rendered $report -> $shot ($(stat -c %s "$shot") bytes)"
