#!/usr/bin/env bash
# Set up .venv if needed, then run the local demo on the default model.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$root"
exec coordinator demo "$@"
