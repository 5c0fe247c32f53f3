#!/usr/bin/env bash
# Installs moedist and its pinned stack into ./.venv (created if missing). Idempotent:
# a second run with an unchanged pyproject.toml/constraints.txt returns in about a second
# (also a plain run after a `test` one: the test install holds the runtime stack too).
#
#   scripts/install.sh          # runtime stack
#   scripts/install.sh test     # runtime stack + test tools
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV="${MOEDIST_VENV:-.venv}"

stamp_key() { { cat pyproject.toml constraints.txt scripts/install.sh; echo "extras=$1"; } | sha256sum | cut -d' ' -f1; }
KEY=$(stamp_key "$EXTRAS")
if [ -f "$VENV/.moedist-installed" ] && grep -qx "$KEY" "$VENV/.moedist-installed"; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q -U pip wheel "setuptools>=77"
# torch first: DeepSpeed builds against the installed torch (no build isolation), and the
# explicit pins keep every later resolver step from replacing it with another build.
"${PIP[@]}" install -q -c constraints.txt torch torchvision
# (re)built here whenever it is missing or not the pinned version, so that a changed pin is
# not left to the editable install below, which would build it without these settings
DS_PIN=$(sed -n 's/^deepspeed==//p' constraints.txt | head -1)
if ! "$VENV/bin/python" -c "import sys, deepspeed; sys.exit(bool(sys.argv[1]) and deepspeed.__version__ != sys.argv[1])" \
    "$DS_PIN" >/dev/null 2>&1; then
  # DS_BUILD_SHM_COMM pre-compiles the CPU comm op now instead of a ~90 s JIT at first use.
  env DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 "${PIP[@]}" install -q --no-build-isolation \
    -c constraints.txt deepspeed
fi
if [ -n "$EXTRAS" ]; then TARGET=".[$EXTRAS]"; else TARGET="."; fi
"${PIP[@]}" install -q --no-build-isolation -c constraints.txt -e "$TARGET"
"${PIP[@]}" check
{ echo "$KEY"; [ -z "$EXTRAS" ] || stamp_key ""; } > "$VENV/.moedist-installed"
echo "moedist installed into $VENV"
