"""Bad ids and planted malicious files give clear errors; nothing is unpickled."""
import io
import json
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

from moedist.errors import CheckpointError, DataError
from moedist.train.checkpoint import read_checkpoint
from moedist.train.loop import check_batch_ids

pytestmark = pytest.mark.integration


class _Boom:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_out_of_range_item_ids_name_the_field():
    batch = {"item_seq": torch.tensor([[1, 2, 0]]), "target": torch.tensor([7]), "user": torch.tensor([1])}
    check_batch_ids(batch, n_item_rows=8, n_user_rows=2, where="t")  # in range: fine
    batch["target"] = torch.tensor([8])
    with pytest.raises(DataError, match=r"'target' holds id 8, outside 0\.\.7"):
        check_batch_ids(batch, n_item_rows=8, n_user_rows=2, where="epoch 0, step 3")
    batch["target"] = torch.tensor([1])
    batch["user"] = torch.tensor([-1])
    with pytest.raises(DataError, match="'user' holds id -1"):
        check_batch_ids(batch, n_item_rows=8, n_user_rows=2, where="t")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch notes the foreign pickle before refusing it
def test_a_pickle_planted_as_checkpoint_is_refused_not_executed(tmp_path):
    ckpt = tmp_path / "last"
    ckpt.mkdir()
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Boom(str(marker)))
    for name in ("model.safetensors", "optimizer.safetensors"):
        (ckpt / name).write_bytes(payload)
    (ckpt / "state.json").write_text(json.dumps({"complete": True}))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        read_checkpoint(ckpt)
    assert not marker.exists()
    # torch.load of the same bytes is what a pickle-based checkpoint would do: weights_only refuses it
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        torch.load(io.BytesIO(payload), weights_only=True)
    assert not marker.exists()


def test_object_arrays_in_feature_shards_are_refused(toy_data, toy_features, tmp_path):
    """A shard whose .npy member holds pickled objects fails with DataError (allow_pickle=False)."""
    import shutil

    from moedist.features.store import load_item_features

    work = tmp_path / "feat"
    shutil.copytree(toy_features, work)
    shard = sorted(work.glob("shard-*.tar"))[0]
    members = []
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            members.append((m, tar.extractfile(m).read()))
    buf = io.BytesIO()
    np.save(buf, np.array([_Boom(str(tmp_path / "pwned"))], dtype=object), allow_pickle=True)
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            if m.name.endswith(".text.npy"):
                data = buf.getvalue()
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    with pytest.raises(DataError, match=shard.name):
        load_item_features(work, verify=False)  # skip the checksum to reach the decoder
    assert not (tmp_path / "pwned").exists()
