"""Shared fixtures: small prepared datasets built in-process, the shared real data, Ray."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """Import ``benchmarks/<name>.py`` (scripts, not a package) for testing its functions;
    a generator for a module-scoped fixture that unregisters it afterwards."""
    spec = importlib.util.spec_from_file_location(f"moedist_bench_{name}", BENCHMARKS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


def toy_source(n_users: int = 120, n_items: int = 40, seed: int = 0):
    """Users walk a ring of items (next item = current + 1 or 2), so order is learnable;
    item topics (id mod 4) show up in categories."""
    from moedist.data.schema import RawSource

    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        t = 1_300_000_000 + int(rng.integers(0, 10**7))
        cur = int(rng.integers(0, n_items))
        for _ in range(int(rng.integers(6, 14))):
            cur = (cur + int(rng.integers(1, 3))) % n_items
            t += int(rng.choice([0, 86400, 7 * 86400]))
            rows.append((f"u{u:03d}", f"i{cur:03d}", t))
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).astype({"user_id": "string", "item_id": "string"})
    inter["rating"] = np.nan
    ids = sorted(inter["item_id"].unique())
    items = pd.DataFrame({
        "item_id": ids, "title": ids, "brand": pd.NA,
        "categories": [["Root", f"topic{int(i[1:]) % 4}"] for i in ids],
        "image": pd.NA, "text": [f"{i} topic{int(i[1:]) % 4}." for i in ids],
    })
    return RawSource("toy", inter, items)


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> Path:
    """A prepared toy dataset (leave-one-out and cold-start splits), built once per session."""
    from moedist.data.prepare import PrepareOptions, prepare_dataset

    out = tmp_path_factory.mktemp("toy") / "prepared"
    prepare_dataset(toy_source(), out, options=PrepareOptions(kcore=3))
    return out


@pytest.fixture(scope="session")
def toy_features(toy_data) -> Path:
    """Random 'text' and 'image' features for the toy items, stored as real feature shards."""
    from moedist.data.dataset import PreparedDataset
    from moedist.features.store import write_feature_arrays

    data = PreparedDataset(toy_data)
    rng = np.random.default_rng(1)
    n = data.n_items
    topic = (data.items["item_id"].str[1:].astype(int).to_numpy() % 4)
    centers = rng.normal(size=(4, 16)).astype(np.float32)
    text = centers[topic] + 0.3 * rng.normal(size=(n, 16)).astype(np.float32)
    image = centers[topic][:, ::-1].copy() + 0.3 * rng.normal(size=(n, 16)).astype(np.float32)
    out = toy_data / "features" / "toy"
    write_feature_arrays(out, item_ids=data.items["item_id"].tolist(), arrays={"text": text, "image": image})
    return out


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance for the module (dashboard on loopback: Train V2 needs it)."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        yield ray
        return
    ray.init(num_cpus=4, object_store_memory=256 * 1024**2, include_dashboard=True, dashboard_host="127.0.0.1",
             log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()
