"""benchmarks/bench_extract.py writes its JSON where --out says, also into a folder that does not
exist yet (``bench_results/`` is git-ignored, so a fresh clone has none). The encoders and Ray
are stubbed: only the script's own bookkeeping runs."""
from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    yield from load_benchmark("bench_extract")


def test_out_in_a_missing_folder_is_written(bench, tmp_path, monkeypatch):
    import types

    import ray

    import moedist.features.pipeline as pipeline
    import moedist.features.store as store

    manifest = {"run": {"steady_items_per_s": 10.0, "first_result_s": 0.1}, "missing": {}, "dims": {"text": 4}}

    def extract(data, out, **kw):
        out.mkdir(parents=True, exist_ok=True)
        return manifest

    monkeypatch.setattr(pipeline, "extract_features_local", extract)
    monkeypatch.setattr(pipeline, "extract_features", extract)
    monkeypatch.setattr(pipeline, "read_items", lambda data: [1, 2, 3])
    monkeypatch.setattr(store, "load_item_features", lambda path: types.SimpleNamespace(features={"text": torch.zeros(3, 4)}))
    monkeypatch.setattr(ray, "init", lambda *a, **k: None)
    monkeypatch.setattr(ray, "shutdown", lambda *a, **k: None)
    monkeypatch.setattr(bench, "actor_torch_threads", lambda: 1)
    out = tmp_path / "bench_results" / "sub" / "extract.json"
    assert bench.main(["--data", str(tmp_path), "--actors", "1", "--no-local-1-thread", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["items"] == 3 and set(result["runs"]) == {"local", "ray_1_actor"}
    assert not list(out.parent.glob(".*.tmp"))  # written through a temporary file, renamed into place
