#!/usr/bin/env bash
# Set up .venv if needed, then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$root"
# The ledger tests also run against a real PostgreSQL server; as root we install and start one.
if [ -z "${MESHPOOL_TEST_POSTGRES_URL:-}" ]; then
    if [ "$(id -u)" = 0 ]; then
        MESHPOOL_TEST_POSTGRES_URL="$("$root/scripts/postgres.sh")"
        export MESHPOOL_TEST_POSTGRES_URL
    else
        echo "test.sh: not root, so no PostgreSQL server: the ledger's PostgreSQL tests will be skipped" >&2
    fi
fi
# The dashboard's test renders the page in headless Chromium; as root we install it if missing.
if ! command -v chromium >/dev/null 2>&1 && [ -z "${MESHPOOL_CHROMIUM:-}" ]; then
    if [ "$(id -u)" = 0 ]; then
        "$root/scripts/chromium.sh" >/dev/null || echo "test.sh: could not install chromium: the dashboard's browser test will be skipped" >&2
    else
        echo "test.sh: not root and no chromium, so the dashboard's browser test will be skipped" >&2
    fi
fi
exec python -m pytest "$@"
