#!/usr/bin/env bash
# Make sure a headless Chromium is installed for the dashboard's browser test, and print its path.
#
# Run as root on a fresh Debian/Ubuntu machine (CI); scripts/test.sh calls it when no Chromium is
# found. Installs the distribution's `chromium` package with apt (nothing is downloaded outside
# the package manager). The test drives it over the DevTools protocol; without it, it is skipped.
set -euo pipefail
log() { echo "chromium.sh: $*" >&2; }

for name in chromium chromium-browser google-chrome; do
    if command -v "$name" >/dev/null 2>&1; then
        command -v "$name"
        exit 0
    fi
done
if [ "$(id -u)" != 0 ]; then
    log "run me as root (I install packages)"
    exit 1
fi
log "installing chromium with apt"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
apt-get install -y -qq chromium >&2
command -v chromium
