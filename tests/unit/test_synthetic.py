"""The embedded synthetic dataset: formats, determinism, atomic/idempotent writes, and that every
planted structure is really there and measurable."""
from __future__ import annotations

import datetime as dt
import gzip
import json
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moedist.data.sources import synthetic as syn
from moedist.data.sources.synthetic import (
    META_FILE,
    REVIEWS_FILE,
    SIZES,
    SyntheticSpec,
    generate_synthetic,
    load_truth,
    planted_topics,
)
from moedist.errors import ConfigError, DataError

AMAZON_REVIEW_FIELDS = {"reviewerID": str, "asin": str, "overall": float, "unixReviewTime": int, "reviewTime": str}


def _read_gz_lines(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _sequences(reviews: list[dict]) -> dict[str, list[dict]]:
    """Each user's reviews in file order (the planted order)."""
    seqs: dict[str, list[dict]] = defaultdict(list)
    for r in reviews:
        seqs[r["reviewerID"]].append(r)
    return seqs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("syn") / "tiny"
    summary = generate_synthetic(out, size="tiny", seed=2025)
    assert summary["generated"] is True
    return out


@pytest.fixture(scope="module")
def data(tiny):
    return {
        "reviews": _read_gz_lines(tiny / REVIEWS_FILE),
        "meta": _read_gz_lines(tiny / META_FILE),
        "truth": load_truth(tiny),
        "topics": planted_topics(tiny),
        "manifest": json.loads((tiny / "synthetic.json").read_text()),
    }


# ----------------------------------------------------------------------------- API / files


def test_sizes_presets():
    assert set(SIZES) == {"tiny", "small", "medium", "large"}
    approx = {"tiny": (60, 40), "small": (1000, 500), "medium": (6000, 3000), "large": (50000, 20000)}
    for name, spec in SIZES.items():
        assert isinstance(spec, SyntheticSpec)
        assert (spec.n_users, spec.n_items) == approx[name]
        assert spec.image_size in (64, 96)
        spec.validate()


def test_determinism_same_seed_identical_different_seed_differs(tmp_path, tiny):
    a = generate_synthetic(tmp_path / "a", size="tiny", seed=2025)
    files_a, files_ref = _all_files(tmp_path / "a"), _all_files(tiny)
    assert files_a.keys() == files_ref.keys()
    for name in files_a:
        assert files_a[name] == files_ref[name], name
    assert a["files"] == json.loads((tiny / "synthetic.json").read_text())["files"]
    # gzip headers carry no time stamp and no file name
    raw = (tmp_path / "a" / REVIEWS_FILE).read_bytes()
    assert raw[:3] == b"\x1f\x8b\x08" and raw[3] == 0 and raw[4:8] == b"\x00\x00\x00\x00"

    generate_synthetic(tmp_path / "b", size="tiny", seed=2026)
    files_b = _all_files(tmp_path / "b")
    assert files_b[REVIEWS_FILE] != files_ref[REVIEWS_FILE]
    assert files_b[META_FILE] != files_ref[META_FILE]


def test_manifest_records_spec_and_hashes(tiny, data):
    import hashlib

    m = data["manifest"]
    assert m["spec"]["seed"] == 2025 and m["spec"]["n_users"] == SIZES["tiny"].n_users
    assert m["size"] == "tiny"
    for rel, digest in m["files"].items():
        assert hashlib.sha256((tiny / rel).read_bytes()).hexdigest() == digest, rel
    assert REVIEWS_FILE in m["files"] and META_FILE in m["files"] and "README.txt" in m["files"]
    readme = (tiny / "README.txt").read_text()
    assert "seed: 2025" in readme and "tiny" in readme and "Planted structure" in readme


def test_idempotent_and_regenerates_on_spec_change(tmp_path):
    out = tmp_path / "d"
    first = generate_synthetic(out, size="tiny", seed=7)
    mtime = (out / REVIEWS_FILE).stat().st_mtime_ns
    again = generate_synthetic(out, size="tiny", seed=7)
    assert again["generated"] is False
    assert again["files"] == first["files"] and again["stats"] == first["stats"]
    assert (out / REVIEWS_FILE).stat().st_mtime_ns == mtime
    changed = generate_synthetic(out, size="tiny", seed=7, overrides={"missing_image_frac": 0.1})
    assert changed["generated"] is True and changed["spec"]["missing_image_frac"] == 0.1
    assert changed["stats"]["items_missing_image"] == 4
    # no temporary or old folders are left beside the dataset
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_atomic_failure_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(syn, "_review_lines", boom)
    with pytest.raises(RuntimeError):
        generate_synthetic(tmp_path / "x", size="tiny")
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_foreign_folder(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(DataError):
        generate_synthetic(out, size="tiny")
    assert (out / "precious.txt").read_text() == "keep me"


def test_bad_specs_raise_config_error(tmp_path):
    with pytest.raises(ConfigError):
        generate_synthetic(tmp_path / "a", size="huge")
    with pytest.raises(ConfigError):
        generate_synthetic(tmp_path / "a", size="tiny", overrides={"n_userz": 5})
    with pytest.raises(ConfigError):
        generate_synthetic(tmp_path / "a", size="tiny", overrides={"missing_image_frac": 0.9})
    with pytest.raises(ConfigError):
        generate_synthetic(tmp_path / "a", size="tiny", overrides={"n_topics": 99})
    assert not (tmp_path / "a").exists()


def test_progress_is_called(tmp_path):
    seen = []
    generate_synthetic(tmp_path / "p", size="tiny", progress=seen.append)
    assert seen and seen == sorted(seen) and seen[-1] > 0


# ----------------------------------------------------------------------------- formats


def test_reviews_are_amazon_2018_json_lines(data):
    reviews, meta = data["reviews"], data["meta"]
    assert len(reviews) == data["manifest"]["stats"]["n_interactions"]
    asins = {m["asin"] for m in meta}
    for r in reviews:
        for key, typ in AMAZON_REVIEW_FIELDS.items():
            assert isinstance(r[key], typ), (key, r)
        assert r["overall"] in (1.0, 2.0, 3.0, 4.0, 5.0)
        assert isinstance(r["verified"], bool) and isinstance(r["summary"], str)
        assert r["asin"] in asins
        day = dt.datetime.fromtimestamp(r["unixReviewTime"], dt.timezone.utc)
        assert (day.hour, day.minute, day.second) == (0, 0, 0)  # midnight UTC
        assert r["reviewTime"] == f"{day.month:02d} {day.day}, {day.year}"
    assert any("reviewText" in r for r in reviews)
    # ids look like the brief's examples
    assert all(r["reviewerID"].startswith("U") and r["asin"].startswith("B") and len(r["asin"]) == 10 for r in reviews)


def test_meta_is_amazon_2018_json_lines(tiny, data):
    meta, truth = data["meta"], data["truth"]
    assert len(meta) == SIZES["tiny"].n_items == len({m["asin"] for m in meta})
    names = truth["topics"]
    for m in meta:
        cat = m["category"]
        assert isinstance(cat, list) and cat[0] == "Synthetic Store"
        info = truth["items"][m["asin"]]
        if info["text"] == "ok":
            assert isinstance(m["title"], str) and m["title"]
            assert cat[1] == names[info["topic"]] and len(cat) == 3
            assert isinstance(m["description"], list)
        elif info["text"] == "missing":
            assert "title" not in m and cat == ["Synthetic Store"]
        else:  # misleading: another topic's text
            assert cat[1] != names[info["topic"]]
        for url in m.get("imageURL", []):
            assert url == f"images/{m['asin']}.jpg" and (tiny / url).is_file()


def test_images_valid_missing_and_corrupt(tiny, data):
    spec = SIZES["tiny"]
    truth = data["truth"]["items"]
    n_missing = n_corrupt = n_ok = 0
    for m in data["meta"]:
        state = truth[m["asin"]]["image"]
        urls = m.get("imageURL") or []
        if state == "missing":
            n_missing += 1
            assert urls == [] and not (tiny / "images" / f"{m['asin']}.jpg").exists()
            continue
        path = tiny / urls[0]
        if state == "corrupt":
            n_corrupt += 1
            with pytest.raises(Exception):
                with Image.open(path) as im:
                    im.load()
            continue
        n_ok += 1
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.size == (spec.image_size, spec.image_size)
            im.verify()
        with Image.open(path) as im:
            im.load()
    assert n_missing == max(1, round(spec.missing_image_frac * spec.n_items))
    assert n_corrupt == max(1, round(spec.corrupt_image_frac * spec.n_items))
    assert n_ok == spec.n_items - n_missing - n_corrupt
    assert data["manifest"]["stats"]["items_missing_image"] == n_missing


def test_zero_missing_and_corrupt_possible(tmp_path):
    out = tmp_path / "clean"
    s = generate_synthetic(out, size="tiny", overrides={"missing_image_frac": 0.0, "corrupt_image_frac": 0.0})
    assert s["stats"]["items_missing_image"] == 0 and s["stats"]["items_corrupt_image"] == 0
    for m in _read_gz_lines(out / META_FILE):
        with Image.open(out / m["imageURL"][0]) as im:
            im.load()


def test_planted_topics_cover_all_items(data):
    topics = data["topics"]
    assert set(topics) == {m["asin"] for m in data["meta"]}
    counts = Counter(topics.values())
    assert sorted(counts) == list(range(SIZES["tiny"].n_topics))
    assert max(counts.values()) - min(counts.values()) <= 1  # balanced


# ----------------------------------------------------------------------------- planted structure


def test_image_mean_colour_recovers_topic(tiny, data):
    X, y = [], []
    for m in data["meta"]:
        if data["truth"]["items"][m["asin"]]["image"] != "ok":
            continue
        with Image.open(tiny / m["imageURL"][0]) as im:
            X.append(np.asarray(im.convert("RGB"), dtype=np.float64).mean(axis=(0, 1)))
        y.append(data["topics"][m["asin"]])
    X, y = np.array(X), np.array(y)
    T = SIZES["tiny"].n_topics
    centroids = np.stack([X[y == t].mean(axis=0) for t in range(T)])
    pred = ((X[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (pred == y).mean() > 0.9


def test_topic_words_in_titles(data):
    hits = total = 0
    for m in data["meta"]:
        info = data["truth"]["items"][m["asin"]]
        if info["text"] != "ok":
            continue
        words = [w for ws in syn._TOPICS[info["topic"]][2] for w in ws]
        total += 1
        hits += any(w.lower() in m["title"].lower() for w in words)
    assert total > 0 and hits / total > 0.95


def test_next_item_same_topic_far_above_chance(data):
    topics = data["topics"]
    same = pairs = 0
    all_t = []
    for seq in _sequences(data["reviews"]).values():
        ts = [topics[r["asin"]] for r in seq]
        all_t += ts
        same += sum(a == b for a, b in zip(ts, ts[1:]))
        pairs += len(ts) - 1
    p = np.bincount(all_t) / len(all_t)
    chance = float((p ** 2).sum())
    rate = same / pairs
    assert rate > 0.5 and rate > 1.8 * chance and rate - chance > 0.25, (rate, chance)


def test_user_interest_drifts(data):
    topics, users = data["topics"], data["truth"]["users"]
    T = SIZES["tiny"].n_topics
    start_drop, end_rise, tv, tv_shuffled = [], [], [], []
    rng = np.random.default_rng(0)
    for uid, seq in _sequences(data["reviews"]).items():
        ts = np.array([topics[r["asin"]] for r in seq])
        if len(ts) < 6:
            continue
        k = len(ts) // 3
        first, last = ts[:k], ts[-k:]
        a, b = users[uid]["start_topic"], users[uid]["end_topic"]
        start_drop.append((first == a).mean() - (last == a).mean())
        end_rise.append((last == b).mean() - (first == b).mean())

        def tvd(x):
            return 0.5 * np.abs(np.bincount(x[:k], minlength=T) / k - np.bincount(x[-k:], minlength=T) / k).sum()

        tv.append(tvd(ts))
        tv_shuffled.append(np.mean([tvd(rng.permutation(ts)) for _ in range(20)]))
    # the planted start topic fades and the end topic grows ...
    assert np.mean(start_drop) > 0.3 and np.mean(end_rise) > 0.3
    # ... and, model-free, first and last thirds differ more than in a time-shuffled history
    assert np.mean(tv) > np.mean(tv_shuffled) + 0.05


def test_timestamps_days_and_heavy_tailed_gaps(data):
    gaps = []
    for seq in _sequences(data["reviews"]).values():
        t = [r["unixReviewTime"] for r in seq]
        assert all(x % 86400 == 0 for x in t)
        assert t == sorted(t)  # non-decreasing in the planted (file) order
        gaps += [(b - a) // 86400 for a, b in zip(t, t[1:])]
    gaps = np.array(gaps)
    assert 0.2 < (gaps == 0).mean() < 0.7  # same-day bursts
    assert ((gaps >= 1) & (gaps <= 7)).mean() > 0.1
    assert (gaps > 30).mean() > 0.05  # some long breaks
    all_t = [r["unixReviewTime"] for r in data["reviews"]]
    assert min(all_t) >= 1199145600 and max(all_t) <= 1538352000  # 2008-01-01 .. 2018-10-01
    # spread over years, and the file is chronological
    assert max(all_t) - min(all_t) > 2 * 365 * 86400
    assert all_t == sorted(all_t)


def test_topic_switches_follow_long_gaps(tmp_path_factory):
    # needs more pairs than tiny has to be sharp: use a bigger, still fast, spec
    out = tmp_path_factory.mktemp("syn-gap") / "g"
    generate_synthetic(out, size="tiny", overrides={"n_users": 300, "n_items": 120})
    topics = planted_topics(out)
    short, long_ = [], []
    for seq in _sequences(_read_gz_lines(out / REVIEWS_FILE)).values():
        for r0, r1 in zip(seq, seq[1:]):
            switched = topics[r0["asin"]] != topics[r1["asin"]]
            gap = (r1["unixReviewTime"] - r0["unixReviewTime"]) // 86400
            (short if gap == 0 else long_ if gap > 60 else []).append(switched)
    assert np.mean(long_) > np.mean(short) + 0.3, (np.mean(long_), np.mean(short))


def test_popularity_is_skewed(data):
    counts = np.sort(np.array(list(Counter(r["asin"] for r in data["reviews"]).values())))[::-1]
    top = counts[: SIZES["tiny"].n_items // 10].sum() / counts.sum()
    assert top > 0.30


def test_kcore_mostly_satisfied_with_a_few_below(data):
    users = Counter(r["reviewerID"] for r in data["reviews"])
    items = Counter(r["asin"] for r in data["reviews"])
    spec = SIZES["tiny"]
    assert len(users) == spec.n_users and len(items) == spec.n_items
    low_u = [u for u, c in users.items() if c < 5]
    low_i = [i for i, c in items.items() if c < 5]
    assert 1 <= len(low_u) <= 0.05 * spec.n_users
    assert 1 <= len(low_i) <= 0.05 * spec.n_items
    assert all(data["truth"]["users"][u]["rare"] for u in low_u)
    assert all(data["truth"]["items"][i]["rare"] for i in low_i)


def test_ratings_follow_topic_preference(data):
    topics, users = data["topics"], data["truth"]["users"]
    pref, other = [], []
    for r in data["reviews"]:
        u = users[r["reviewerID"]]
        (pref if topics[r["asin"]] in (u["start_topic"], u["end_topic"]) else other).append(r["overall"])
    assert np.mean(pref) > np.mean(other) + 0.5
    assert set(Counter(r["overall"] for r in data["reviews"])) >= {2.0, 3.0, 4.0, 5.0}


def test_no_duplicates_by_default_and_planted_on_request(tmp_path, data):
    pairs = Counter((r["reviewerID"], r["asin"]) for r in data["reviews"])
    assert max(pairs.values()) == 1
    out = tmp_path / "dup"
    s = generate_synthetic(out, size="tiny", overrides={"duplicate_frac": 0.05})
    reviews = _read_gz_lines(out / REVIEWS_FILE)
    pairs = Counter((r["reviewerID"], r["asin"]) for r in reviews)
    n_dup = sum(c - 1 for c in pairs.values())
    assert n_dup == s["stats"]["duplicate_interactions"] == round(0.05 * (len(reviews) - n_dup))
    for seq in _sequences(reviews).values():  # still chronological per user
        t = [r["unixReviewTime"] for r in seq]
        assert t == sorted(t)
    # repeats only among regular users/items: the 5-core (with repeats counted) is unchanged
    truth = load_truth(out)
    users, items = _kcore([(r["reviewerID"], r["asin"]) for r in reviews])
    assert users == {u for u, info in truth["users"].items() if not info["rare"]}
    assert items == {i for i, info in truth["items"].items() if not info["rare"]}


def test_small_generation_is_fast(tmp_path):
    t0 = time.perf_counter()
    s = generate_synthetic(tmp_path / "small", size="small")
    elapsed = time.perf_counter() - t0
    assert elapsed < 30, elapsed
    st = s["stats"]
    assert st["n_users"] == 1000 and st["n_items"] == 500 and st["n_interactions"] > 8000
    assert st["top10pct_item_share"] > 0.3


def _kcore(pairs: list[tuple[str, str]], k: int = 5) -> tuple[set, set]:
    users, items = {u for u, _ in pairs}, {i for _, i in pairs}
    while True:
        kept = [(u, i) for u, i in pairs if u in users and i in items]
        uc, ic = Counter(u for u, _ in kept), Counter(i for _, i in kept)
        new_u = {u for u in users if uc[u] >= k}
        new_i = {i for i in items if ic[i] >= k}
        if new_u == users and new_i == items:
            return users, items
        users, items = new_u, new_i


def test_five_core_removes_exactly_the_planted_rare_ones(data):
    users, items = _kcore([(r["reviewerID"], r["asin"]) for r in data["reviews"]])
    truth = data["truth"]
    assert users == {u for u, info in truth["users"].items() if not info["rare"]}
    assert items == {i for i, info in truth["items"].items() if not info["rare"]}


def test_an_edited_or_damaged_file_is_generated_again(tmp_path):
    """Reuse checks every file against the sha256 the manifest recorded: an edited review
    file or a damaged image would otherwise be prepared as if it were the spec's dataset."""
    import gzip
    import hashlib

    out = tmp_path / "syn"
    first = generate_synthetic(out, size="tiny", seed=7)
    reviews = out / first["reviews"]
    original = hashlib.sha256(reviews.read_bytes()).hexdigest()
    lines = gzip.decompress(reviews.read_bytes()).decode().splitlines()
    reviews.write_bytes(gzip.compress(("\n".join(lines[1:]) + "\n").encode()))  # one review dropped
    again = generate_synthetic(out, size="tiny", seed=7)
    assert again["generated"] and hashlib.sha256(reviews.read_bytes()).hexdigest() == original
    image = next(p for p in sorted((out / "images").iterdir()) if p.stat().st_size > 100)
    good = image.read_bytes()
    image.write_bytes(good[: len(good) // 2])
    assert generate_synthetic(out, size="tiny", seed=7)["generated"] and image.read_bytes() == good
    assert not generate_synthetic(out, size="tiny", seed=7)["generated"]  # intact: reused
