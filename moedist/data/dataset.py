"""Reading prepared datasets and turning them into model batches.

:class:`PreparedDataset` loads the Parquet tables written by ``moedist data prepare``.
:class:`SequentialSamples` (HM4SR, SASRec) and :class:`ColdStartData` (MAMEX, content
baselines) build batches in the layout of ``docs/contracts.md`` with vectorised numpy
gathers: no per-sample Python loop on the training path.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from moedist.data.prepare import load_manifest
from moedist.errors import DataError

_REQUIRED = {
    "interactions.parquet": {"user_idx", "item_idx", "timestamp", "seq_pos", "loo_split", "cold_split"},
    "items.parquet": {"item_idx", "item_id", "text", "categories", "image", "cold_split"},
    "users.parquet": {"user_idx", "user_id"},
}


class PreparedDataset:
    """The tables of a prepared dataset directory, checked and indexed for batching."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = load_manifest(self.path)
        tables = {}
        for name, cols in _REQUIRED.items():
            file = self.path / name
            if not file.is_file():
                raise DataError("missing table; re-run `moedist data prepare`", path=file)
            try:
                df = pd.read_parquet(file)
            except Exception as e:  # pyarrow raises several types for corrupt files
                raise DataError(f"cannot read Parquet table ({type(e).__name__}: {e})", path=file) from None
            missing = cols - set(df.columns)
            if missing:
                raise DataError(f"table lacks columns {sorted(missing)}", path=file)
            tables[name] = df
        self.interactions = tables["interactions.parquet"]
        self.items = tables["items.parquet"].sort_values("item_idx").reset_index(drop=True)
        self.users = tables["users.parquet"]
        self.n_users = len(self.users)
        self.n_items = len(self.items)
        self.name = self.manifest.get("name", self.path.name)
        self.max_interval_seconds = int(self.manifest.get("max_interval_seconds", 0))
        if self.interactions.empty:
            raise DataError("dataset has no interactions", path=self.path / "interactions.parquet")
        bad = (self.interactions["item_idx"] < 1) | (self.interactions["item_idx"] > self.n_items)
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(f"item_idx out of range 1..{self.n_items} at row {row}", path=self.path / "interactions.parquet")

        # CSR layout of every user's chronological sequence: user u's items are
        # seq_items[offsets[u]:offsets[u+1]] (u = 1..U; offsets[0] unused padding user).
        inter = self.interactions.sort_values(["user_idx", "seq_pos"], kind="mergesort")
        self.seq_items = inter["item_idx"].to_numpy(np.int64)
        self.seq_times = inter["timestamp"].to_numpy(np.int64)
        counts = np.bincount(inter["user_idx"].to_numpy(np.int64), minlength=self.n_users + 1)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.seq_lengths = counts

    # ------------------------------------------------------------------ item side
    @property
    def n_item_rows(self) -> int:
        """Rows of every item table including the padding row 0."""
        return self.n_items + 1

    def category_vocab(self) -> list[str]:
        """Category strings in order of first appearance over items sorted by index (spec 1.1 step 7)."""
        seen: dict[str, int] = {}
        for cats in self.items["categories"]:
            for c in cats:
                seen.setdefault(str(c), len(seen))
        return list(seen)

    def category_multihot(self) -> torch.Tensor:
        """``[N, C]`` float multi-hot category labels; row 0 (padding) is zeros."""
        vocab = {c: i for i, c in enumerate(self.category_vocab())}
        out = torch.zeros(self.n_item_rows, max(len(vocab), 1))
        for idx, cats in zip(self.items["item_idx"].to_numpy(), self.items["categories"]):
            for c in cats:
                out[idx, vocab[str(c)]] = 1.0
        return out

    def item_split(self) -> np.ndarray:
        """Cold-start split label per item row (index 0 = padding -> ``""``)."""
        labels = np.full(self.n_item_rows, "", dtype=object)
        labels[self.items["item_idx"].to_numpy()] = self.items["cold_split"].to_numpy()
        return labels

    def train_item_counts(self, protocol: str) -> torch.Tensor:
        """Interaction count per item row over the training part of ``protocol`` (popularity)."""
        col = "loo_split" if protocol == "loo" else "cold_split"
        train = self.interactions.loc[self.interactions[col] == "train", "item_idx"].to_numpy(np.int64)
        return torch.from_numpy(np.bincount(train, minlength=self.n_item_rows).astype(np.float32))


# ---------------------------------------------------------------------- sequential


@dataclass
class SequentialSamples:
    """Leave-one-out samples of one split: sample s predicts ``seq_items[target_pos[s]]``
    from the (at most ``max_len``) items before it in the same user's sequence."""

    data: PreparedDataset
    users: np.ndarray  # [S] user_idx
    target_pos: np.ndarray  # [S] global position of the target in data.seq_items
    max_len: int

    @classmethod
    def build(cls, data: PreparedDataset, split: str, max_len: int) -> "SequentialSamples":
        """Samples as RecBole's prefix augmentation + leave-one-out (spec 1.2).

        For a user with n items (positions 0..n-1): test predicts n-1 from 0..n-2, valid
        predicts n-2 from 0..n-3, train predicts every p in 1..n-3 from 0..p-1.
        """
        lengths = data.seq_lengths[1:]
        users = np.arange(1, data.n_users + 1, dtype=np.int64)
        starts = data.offsets[users]
        if split == "test":
            keep = lengths >= 2
            return cls(data, users[keep], starts[keep] + lengths[keep] - 1, max_len)
        if split == "valid":
            keep = lengths >= 3
            return cls(data, users[keep], starts[keep] + lengths[keep] - 2, max_len)
        if split != "train":
            raise ValueError(f"unknown split {split!r}")
        n_train = np.maximum(lengths - 3, 0)
        u = np.repeat(users, n_train)
        first = np.repeat(starts + 1, n_train)
        within = np.arange(n_train.sum()) - np.repeat(np.cumsum(n_train) - n_train, n_train)
        return cls(data, u, first + within, max_len)

    def __len__(self) -> int:
        return int(self.users.shape[0])

    def batch(self, index: np.ndarray) -> dict[str, torch.Tensor]:
        """Batch of the samples ``index`` (``[B]`` positions into this split)."""
        users = self.users[index]
        tgt = self.target_pos[index]
        start_user = self.data.offsets[users]
        hist_start = np.maximum(start_user, tgt - self.max_len)  # keep the most recent max_len items
        hist_len = tgt - hist_start
        cols = np.arange(self.max_len)
        pos = hist_start[:, None] + cols[None, :]  # [B, L]
        valid = cols[None, :] < hist_len[:, None]
        pos = np.where(valid, pos, 0)
        item_seq = np.where(valid, self.data.seq_items[pos], 0)
        time_seq = np.where(valid, self.data.seq_times[pos], 0)
        return {
            "user": torch.from_numpy(users.astype(np.int64)),
            "item_seq": torch.from_numpy(item_seq.astype(np.int64)),
            "item_seq_len": torch.from_numpy(hist_len.astype(np.int64)),
            "time_seq": torch.from_numpy(time_seq.astype(np.int64)),
            "target": torch.from_numpy(self.data.seq_items[tgt].astype(np.int64)),
        }

    def history_items(self, index: np.ndarray) -> list[np.ndarray]:
        """Items before each sample's target (for optional history masking at evaluation)."""
        users = self.users[index]
        return [self.data.seq_items[self.data.offsets[u] : t] for u, t in zip(users, self.target_pos[index])]


# ---------------------------------------------------------------------- cold start


class ColdStartData:
    """Cold-start item protocol (spec 3.1): train on warm items, rank cold items."""

    def __init__(self, data: PreparedDataset):
        self.data = data
        inter = data.interactions
        split = inter["cold_split"].to_numpy()
        users = inter["user_idx"].to_numpy(np.int64)
        items = inter["item_idx"].to_numpy(np.int64)
        self.train_users = users[split == "train"]
        self.train_items = items[split == "train"]
        labels = data.item_split()
        self.candidates = np.flatnonzero((labels == "valid") | (labels == "test")).astype(np.int64)
        if self.candidates.size == 0:
            raise DataError("the cold-start split has no validation/test items", path=data.path)
        self._heldout = {s: (users[split == s], items[split == s]) for s in ("valid", "test")}
        # sorted keys user*N + item of training positives, for rejection of sampled negatives
        self._n = data.n_item_rows
        self._pos_keys = np.unique(self.train_users * self._n + self.train_items)

    def __len__(self) -> int:
        return int(self.train_users.shape[0])

    def sample_negatives(self, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One negative per user, uniform over all items (cold ones included, spec G-MX-5),
        rejecting the user's training positives."""
        neg = rng.integers(1, self._n, size=users.shape[0])
        for _ in range(100):
            keys = users * self._n + neg
            pos = np.searchsorted(self._pos_keys, keys)
            pos = np.minimum(pos, len(self._pos_keys) - 1)
            bad = self._pos_keys[pos] == keys
            if not bad.any():
                return neg
            neg[bad] = rng.integers(1, self._n, size=int(bad.sum()))
        return neg  # users who interacted with (nearly) every item: keep the last draw

    def epoch_triples(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(user, pos, neg) for every training interaction, shuffled."""
        perm = rng.permutation(len(self))
        users, pos = self.train_users[perm], self.train_items[perm]
        return users, pos, self.sample_negatives(users, rng)

    def heldout(self, split: str) -> tuple[np.ndarray, list[np.ndarray]]:
        """Users with >= 1 interaction with a ``split`` item, and each user's held-out items."""
        users, items = self._heldout[split]
        order = np.argsort(users, kind="mergesort")
        users, items = users[order], items[order]
        uniq, first = np.unique(users, return_index=True)
        groups = np.split(items, first[1:])
        return uniq, [np.unique(g) for g in groups]
