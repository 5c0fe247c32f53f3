"""benchmarks/quality.py's grid expansion and validation-only selection."""
from __future__ import annotations

import pytest

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def quality():
    yield from load_benchmark("quality")


def test_grid_skips_top_k_above_experts_and_keeps_the_default_point_as_the_plain_variant(quality):
    v = quality.grid_variants("mamex", "mamex", [], ["mamex.num_experts=2,4", "mamex.top_k=1,2,3"])
    # (2,1) (2,2) (4,1) (4,2) (4,3); (2,3) is impossible. (4,2) is MAMEX's default (4 experts, top-2).
    assert set(v) == {"mamex", "mamex [num_experts=2 top_k=1]", "mamex [num_experts=2 top_k=2]",
                      "mamex [num_experts=4 top_k=1]", "mamex [num_experts=4 top_k=3]"}
    assert v["mamex"] == ("mamex", [])
    assert v["mamex [num_experts=2 top_k=1]"] == ("mamex", ["mamex.num_experts=2", "mamex.top_k=1"])


def test_grid_keeps_the_base_variants_own_overrides(quality):
    v = quality.grid_variants("mamex w/o Align", "mamex", ["mamex.use_align=false"], ["mamex.lambda_adapter=1.0,0.1"])
    assert v == {"mamex w/o Align": ("mamex", ["mamex.use_align=false"]),
                 "mamex w/o Align [lambda_adapter=0.1]": ("mamex", ["mamex.use_align=false", "mamex.lambda_adapter=0.1"])}


def test_grid_rejects_a_malformed_item(quality):
    with pytest.raises(SystemExit, match="KEY=V1,V2"):
        quality.grid_variants("mamex", "mamex", [], ["mamex.num_experts"])


def test_selection_uses_validation_only(quality):
    variants = {
        "a": {"valid": {"ndcg@10": 0.20}, "test": {"ndcg@10": 0.30}, "per_seed": [{}, {}]},
        "b": {"valid": {"ndcg@10": 0.25}, "test": {"ndcg@10": 0.10}, "per_seed": [{}, {}]},
        "c": {"valid": {"ndcg@10": 0.25}, "test": {"ndcg@10": 0.40}},
    }
    sel = quality.select_best(variants)
    assert sel["best"] == "b"  # highest valid; "a" has the best test and "c" ties on valid but comes later
    assert sel["chosen_on"] == "valid"
    assert sel["variants"]["b"] == {"valid": 0.25, "test": 0.10, "runs": 2}
    assert sel["variants"]["c"]["runs"] == 1
