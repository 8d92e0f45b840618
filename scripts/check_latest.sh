#!/usr/bin/env bash
# Drift check: install the newest versions pyproject.toml allows (ignoring constraints.txt) into a
# scratch venv, show which differ from the pinned ones, and run the test suite on them, so a
# release that breaks edgevlm is seen here before a user installs it.
#   scripts/check_latest.sh            the fast suite (pytest -m "not slow")
#   scripts/check_latest.sh --full     every test, as CI runs them
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${DRIFT_VENV:-/tmp/edgevlm-latest}"
rm -rf "$venv"
python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
# torch stays at the pinned CPU build: a newer torch from the index is a multi-GB CUDA build
pip install -q --upgrade pip
pip install -q "torch==2.13.0" -e ".[dev]"
echo "versions that differ from constraints.txt:"
# freeze's comments, the project itself and torch's local label (+cpu) are not versions to compare
pip freeze | grep -v -i "^#\|^-e\|^edgevlm" | sed 's/+cpu$//' | sort > "$venv/latest.txt"
grep -v "^#" constraints.txt | sort | comm -13 - "$venv/latest.txt" | sed 's/^/  /' || true
export HF_HUB_OFFLINE=1
if [ "${1:-}" = "--full" ]; then
  python -m pytest -q
else
  python -m pytest -q -m "not slow"
fi
