#!/usr/bin/env bash
# Gathers into ./.whl the wheels that benchmarks/device_check.py needs on a GPU machine whose
# image already holds PyTorch, NumPy, pandas, PyArrow and PyYAML but not DeepSpeed (a machine
# with no package index: the wheels travel with the checkout). DeepSpeed is built here as a
# pure-Python wheel (no compiled ops: moedist hands DeepSpeed a torch.optim optimizer), at the
# version constraints.txt pins; its run-time dependencies that such images lack (and
# safetensors) are downloaded for the target's Python (default 3.12, x86-64 manylinux).
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

# DeepSpeed's run-time requirements (all of them: `import deepspeed` reads einops, msgpack,
# psutil, tqdm, py-cpuinfo, ... at import) and theirs, less what the image has, plus
# safetensors (moedist's checkpoints), at the versions this environment runs them with
mapfile -t DEPS < <("$PY" - <<'PYEOF'
import importlib.metadata as md

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

IMAGE_HAS = {"torch", "numpy", "pandas", "pyarrow", "pyyaml"}  # and what they require
def requires(dist):  # for Linux and this Python, without extras
    out = []
    for r in map(Requirement, md.requires(dist) or []):
        if r.marker is None or r.marker.evaluate({"extra": ""}):
            out.append(canonicalize_name(r.name))
    return out
have, todo = set(), list(IMAGE_HAS)
while todo:  # the image's packages and their requirements
    n = todo.pop()
    if n not in have:
        have.add(n)
        todo += requires(n) if n != "torch" else []  # torch's own (nvidia-*, triton, sympy, ...) come with it
need, todo = [], ["deepspeed", "safetensors"]
while todo:
    n = todo.pop()
    if n in have or n in need:
        continue
    need.append(n)
    todo += requires(n)
for n in sorted(need):
    if n != "deepspeed":
        print(f"{n}=={md.version(n)}")
PYEOF
)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${DEPS[@]}"
ls -1 .whl
du -sh .whl
