#!/usr/bin/env bash
# Gathers into ./.whl the wheels that benchmarks/device_check.py needs on a GPU machine whose
# image already holds PyTorch, NumPy, pandas, PyArrow and PyYAML but not DeepSpeed (a machine
# with no package index: the wheels travel with the checkout). DeepSpeed is built here as a
# pure-Python wheel (no compiled ops: moedist hands DeepSpeed a torch.optim optimizer), at the
# version constraints.txt pins; its dependencies that such images lack are downloaded for the
# target's Python (default 3.12, x86-64 manylinux).
#
#   scripts/device_wheels.sh [PYTHON_VERSION]
#
# Then, on the GPU machine, from the checkout (with .whl carried along):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   python3 benchmarks/device_check.py --data DATA --features FEATURES --out OUT.json
set -euo pipefail
cd "$(dirname "$0")/.."
PYV="${1:-3.12}"
PY=.venv/bin/python
[ -x "$PY" ] || { echo "error: run scripts/install.sh first (the DeepSpeed wheel is built with its pip)" >&2; exit 1; }
pin() { grep -E "^$1==" constraints.txt | head -1 || true; }
version_here() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }

mkdir -p .whl
rm -f .whl/deepspeed-*.whl
DS=$(pin deepspeed); DS=${DS:-deepspeed==$(version_here deepspeed)}
env DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=0 "$PY" -m pip wheel -q --no-cache-dir --no-deps --no-build-isolation -w .whl "$DS"

DEPS=()
for name in hjson pydantic pydantic-core annotated-types typing-inspection; do
  DEPS+=("$name==$(version_here "$name")")  # the versions this environment runs DeepSpeed with
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${DEPS[@]}"
ls -1 .whl
du -sh .whl
