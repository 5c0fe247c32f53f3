"""Atomic outputs get the permissions a plain write would give them (the umask's), not the
owner-only modes of temporary files: others who share the folder must be able to read them."""
from __future__ import annotations

import os
import stat
from contextlib import contextmanager

import numpy as np
import pytest

from moedist.io import atomic_write_json, current_umask, temp_dir, temp_file


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_files_and_folders_follow_the_umask(tmp_path, mask):
    with umask(mask):
        assert current_umask() == mask
        atomic_write_json(tmp_path / "r.json", {"a": 1})
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        assert _mode(tmp_path / "r.json") == _mode(plain) == 0o666 & ~mask
        fd, name = temp_file(tmp_path)
        os.close(fd)
        assert _mode(name) == 0o666 & ~mask
        d = temp_dir(tmp_path, prefix=".x-")
        (tmp_path / "plain-dir").mkdir()
        assert _mode(d) == _mode(tmp_path / "plain-dir") == 0o777 & ~mask


def test_prepared_data_and_feature_shards_are_readable_by_the_group_and_others(tmp_path):
    from moedist.data.dataset import PreparedDataset
    from moedist.data.prepare import PrepareOptions, prepare_dataset
    from moedist.features.store import write_feature_arrays
    from tests.conftest import toy_source

    with umask(0o022):
        out = tmp_path / "prepared"
        prepare_dataset(toy_source(n_users=30, n_items=12), out, options=PrepareOptions(kcore=2))
        data = PreparedDataset(out)
        feats = out / "features" / "toy"
        write_feature_arrays(feats, item_ids=data.items["item_id"].tolist(),
                             arrays={"text": np.ones((data.n_items, 4), dtype=np.float32)})
    assert _mode(out) == 0o755
    written = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".tar" for p in written) and any(p.name == "manifest.json" for p in written)
    for p in written:
        assert _mode(p) == 0o644, p
    for p in [q for q in out.rglob("*") if q.is_dir()]:
        assert _mode(p) == 0o755, p
