"""benchmarks/bench_experts.py: the three top-k forms it times compute the same outputs, and
its JSON carries the skew and ratios it claims."""
from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import load_benchmark

bench = pytest.fixture(scope="module")(lambda: (yield from load_benchmark("bench_experts")))


def test_small_run_writes_consistent_json(bench, tmp_path, monkeypatch):
    out = tmp_path / "experts.json"
    monkeypatch.setattr(sys, "argv", ["bench_experts.py", "--points", "4x2", "3x3", "--tokens", "64",
                                      "--in-features", "16", "--out-features", "8", "--steps", "2",
                                      "--skew", "2.0", "--out", str(out)])
    bench.main()  # asserts inside that the three forms agree
    result = json.loads(out.read_text())
    assert set(result["results"]) == {"4x2", "3x3"}
    for point, r in result["results"].items():
        assert r["ratios"]["grouped_mm"] == 1.0
        for form in ("padded_bmm", "every_expert"):
            assert r["ratios"][form] == pytest.approx(r[f"{form}_ms"] / r["grouped_mm_ms"], rel=2e-3, abs=2e-3)
    assert result["results"]["3x3"]["busiest_over_mean"] == 1.0  # k = E: every expert gets every token
    assert result["results"]["4x2"]["busiest_over_mean"] > 1.0  # skewed logits: uneven experts


def test_bad_point_is_a_clear_error(bench, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["bench_experts.py", "--points", "4by2", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="EXPERTSxTOPK"):
        bench.main()
    monkeypatch.setattr(sys, "argv", ["bench_experts.py", "--points", "2x3", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="1 <= top-k <= experts"):
        bench.main()
