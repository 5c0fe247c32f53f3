#!/usr/bin/env sh
# Prints the moedist image tag, derived from the repository (no network, no Python needed):
#   <pyproject version>-torch<torch pin>-ray<ray pin>      e.g. 0.1.0-torch2.14.1-ray2.60.0
# Use:  docker build -f cluster/Dockerfile -t "moedist:$(cluster/image-tag.sh)" .
# The manifests in k8s/ and cluster/ carry the same tag; tests/unit/test_k8s.py checks it.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
version=$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' "$root/pyproject.toml" | head -n 1)
torch=$(sed -n 's/^torch==\([^ ;#]*\).*/\1/p' "$root/constraints.txt" | head -n 1)
ray=$(sed -n 's/^ray==\([^ ;#]*\).*/\1/p' "$root/constraints.txt" | head -n 1)
if [ -z "$version" ] || [ -z "$torch" ] || [ -z "$ray" ]; then
  echo "image-tag.sh: cannot read version/torch/ray from pyproject.toml and constraints.txt" >&2
  exit 1
fi
echo "${version}-torch${torch}-ray${ray}"
