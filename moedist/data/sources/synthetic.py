"""The embedded default dataset: a deterministic synthetic Amazon-Reviews-2018-style corpus.

:func:`generate_synthetic` writes, from a size preset and a seed,

- ``Synthetic_5.json.gz``: gzip JSON lines in the Amazon 2018 review format
  (``reviewerID``, ``asin``, ``overall``, ``unixReviewTime``, ``reviewTime``, ``verified``,
  ``summary``, and usually ``reviewText``), in chronological order (ties: each user's planted
  order, so input-file order breaks same-day ties correctly);
- ``meta_Synthetic.json.gz``: gzip JSON lines in the Amazon 2018 metadata format (``asin``,
  ``title``, ``brand``, ``category``, ``description``, ``imageURL``, ``imageURLHighRes``,
  ``main_cat``, ``price``); ``imageURL`` holds paths *relative to the dataset folder*
  (``images/<asin>.jpg``);
- ``images/<asin>.jpg``: real JPEGs drawn with PIL;
- ``truth.json``: the planted ground truth (item topics/sub-topics, user topic drift, special
  items); ``README.txt``: what is planted; ``synthetic.json``: spec + sha256 of every file.

So the whole pipeline (parse -> prepare -> extract features -> train) runs with no downloads.

Planted structure (see ``README.txt`` of a generated folder for the numbers):

- T topics, each with S sub-topics. An item's topic shows in its image (background hue and a
  per-topic shape pattern in a dark shade of the hue; the sub-topic sets the number of shapes)
  and in its text (topic vocabulary and brands in the title, topic name in the category path).
  A few items have misleading text (another topic's) or no text; a few have no image or a
  corrupt image file.
- Each user drifts from a start topic A to an end topic B (plus a minor topic C): the topic
  mixture at relative position f of the history is 0.8*((1-f)*A + f*B) + 0.15*C + 0.05*uniform.
- Short-term structure: users mostly stay in the current topic; within it they often stay in the
  last item's sub-topic and often take the *next item of a per-sub-topic chain* (a "series",
  ordered by popularity). A few percent of interactions are off-topic bestsellers. Users leave
  a topic whose weight in their mixture has faded.
- Time: day-granular Unix timestamps (midnight UTC), heavy-tailed gaps (same-day bursts, days,
  weeks, a few months) scaled by a per-user activity rate; the longer the gap, the likelier a
  topic switch (5% same day .. 85% after two months).
- Zipf-like popularity within topics, and topics of unequal popularity.
- Ratings 1..5 increase with the user's current preference for the item's topic.
- A few planted users/items have 1..4 interactions; all others keep >= 5 without them, so the
  5-core is exactly "everything but the planted rare users and items".
"""
from __future__ import annotations

import colorsys
import datetime as _dt
import gzip
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from moedist.errors import ConfigError, DataError
from moedist.io import temp_dir

GENERATOR_VERSION = 1
DATASET_NAME = "Synthetic"
REVIEWS_FILE = "Synthetic_5.json.gz"
META_FILE = "meta_Synthetic.json.gz"
IMAGES_DIR = "images"
TRUTH_FILE = "truth.json"
README_FILE = "README.txt"
MANIFEST_FILE = "synthetic.json"
STORE_NAME = "Synthetic Store"
KCORE = 5
JPEG_QUALITY = 85
_START_DAY = 15706  # 2013-01-01 in days since the Unix epoch
_START_SPREAD_DAYS = 3 * 365
_END_DAY = 17804  # 2018-09-30: no review after this (as in the Amazon 2018 dump)
_EARLIEST_DAY = 13879  # 2008-01-01: long histories may start earlier than _START_DAY
_MEAN_GAP_DAYS = 23.2  # expected gap of _draw_gaps at activity 1


@dataclass
class SyntheticSpec:
    n_users: int
    n_items: int
    n_topics: int
    mean_seq_len: float
    image_size: int
    seed: int
    missing_image_frac: float = 0.03  # items without any image (imageURL [] or absent)
    corrupt_image_frac: float = 0.01  # items whose image file is broken (truncated / not a JPEG)
    duplicate_frac: float = 0.0  # extra repeated (user, item) interactions, as a fraction of rows
    n_subtopics: int = 4  # sub-topics per topic
    rare_user_frac: float = 0.02  # users with only 1..4 interactions (removed by 5-core)
    rare_item_frac: float = 0.01  # items with only 1..4 interactions (removed by 5-core)
    misleading_text_frac: float = 0.05  # items whose text describes another topic
    missing_text_frac: float = 0.03  # items with no title/brand/description and a bare category
    popularity_exponent: float = 1.0  # Zipf exponent of item popularity within a topic
    topic_popularity_exponent: float = 0.8  # Zipf exponent of topic popularity

    def validate(self) -> None:
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"synthetic spec: {msg}")

        for name in ("n_users", "n_items", "n_topics", "image_size", "n_subtopics"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
                raise bad(f"{name} must be an integer, got {v!r}")
        if not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool) or self.seed < 0:
            raise bad(f"seed must be a non-negative integer, got {self.seed!r}")
        if not 2 <= self.n_topics <= len(_TOPICS):
            raise bad(f"n_topics must be in 2..{len(_TOPICS)}, got {self.n_topics}")
        if not 1 <= self.n_subtopics <= 4 + len(_EXTRA_SUBTOPICS):
            raise bad(f"n_subtopics must be in 1..{4 + len(_EXTRA_SUBTOPICS)}, got {self.n_subtopics}")
        if self.n_items < 3 * self.n_topics * self.n_subtopics:
            raise bad(
                f"n_items ({self.n_items}) must be >= 3 * n_topics * n_subtopics "
                f"({3 * self.n_topics * self.n_subtopics})"
            )
        if self.n_users < 10:
            raise bad(f"n_users must be >= 10, got {self.n_users}")
        if not 5 <= float(self.mean_seq_len) <= 200:
            raise bad(f"mean_seq_len must be in [5, 200], got {self.mean_seq_len}")
        if not 16 <= self.image_size <= 1024:
            raise bad(f"image_size must be in 16..1024, got {self.image_size}")
        for name in ("missing_image_frac", "corrupt_image_frac", "duplicate_frac", "rare_user_frac",
                     "rare_item_frac", "misleading_text_frac", "missing_text_frac"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= float(v) <= 0.5:
                raise bad(f"{name} must be a number in [0, 0.5], got {v!r}")
        if self.missing_image_frac + self.corrupt_image_frac > 0.5:
            raise bad("missing_image_frac + corrupt_image_frac must be <= 0.5")
        for name in ("popularity_exponent", "topic_popularity_exponent"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= float(v) <= 3.0:
                raise bad(f"{name} must be a number in [0, 3], got {v!r}")
        if self.misleading_text_frac + self.missing_text_frac > 0.5:
            raise bad("misleading_text_frac + missing_text_frac must be <= 0.5")
        # rare items need users that do not have them yet: keep sequences well below the catalog
        if self.mean_seq_len * 4 > self.n_items:
            raise bad(f"mean_seq_len ({self.mean_seq_len}) must be <= n_items / 4 ({self.n_items / 4})")


SIZES: dict[str, SyntheticSpec] = {
    # unit tests: generates in well under 2 s
    "tiny": SyntheticSpec(n_users=60, n_items=40, n_topics=4, mean_seq_len=6.0, image_size=64, seed=2025, n_subtopics=2,
                          popularity_exponent=2.5, topic_popularity_exponent=1.5),
    # the default demo
    "small": SyntheticSpec(n_users=1000, n_items=500, n_topics=8, mean_seq_len=12.0, image_size=64, seed=2025,
                           popularity_exponent=0.9),
    "medium": SyntheticSpec(n_users=6000, n_items=3000, n_topics=12, mean_seq_len=14.0, image_size=96, seed=2025,
                            popularity_exponent=0.6),
    # benchmarks
    "large": SyntheticSpec(n_users=50000, n_items=20000, n_topics=16, mean_seq_len=15.0, image_size=96, seed=2025,
                           popularity_exponent=0.5),
}

# ----------------------------------------------------------------------------- vocabulary

# (topic name, sub-topic names, words per sub-topic, brands)
_TOPICS: list[tuple[str, list[str], list[list[str]], list[str]]] = [
    ("Kitchen & Dining", ["Cookware", "Cutlery & Utensils", "Bakeware", "Coffee & Tea"],
     [["skillet", "saucepan", "stockpot"], ["spatula", "whisk", "ladle"],
      ["muffin tin", "baking sheet", "rolling pin"], ["kettle", "teapot", "french press"]],
     ["Ferrocast", "Copperleaf", "Hearthwell"]),
    ("Garden & Outdoor", ["Planters", "Watering", "Garden Tools", "Seeds & Bulbs"],
     [["planter", "flower pot", "window box"], ["garden hose", "watering can", "sprinkler"],
      ["trowel", "pruner", "rake"], ["tomato seeds", "tulip bulbs", "seed tray"]],
     ["Greenfurrow", "Bloomfield", "Mossgate"]),
    ("Camping & Hiking", ["Shelter", "Packs", "Lighting", "Camp Kitchen"],
     [["tent", "tarp", "hammock"], ["backpack", "daypack", "dry bag"],
      ["lantern", "headlamp", "flashlight"], ["camp stove", "canteen", "mess kit"]],
     ["Trailpine", "Ridgecrest", "Summitra"]),
    ("Beauty", ["Makeup", "Skin Care", "Nails", "Fragrance"],
     [["lipstick", "mascara", "eyeliner"], ["serum", "moisturizer", "cleanser"],
      ["nail polish", "cuticle oil", "nail file"], ["perfume", "body mist", "cologne"]],
     ["Lumière Rose", "Velvetine", "Auralis"]),
    ("Toys & Games", ["Puzzles", "Building Toys", "Dolls & Figures", "Outdoor Play"],
     [["jigsaw puzzle", "brain teaser", "puzzle cube"], ["building blocks", "construction set", "magnetic tiles"],
      ["doll", "action figure", "plush bear"], ["kite", "frisbee", "bubble wand"]],
     ["Playwright", "Tinkertot", "Kidoodle"]),
    ("Pet Supplies", ["Dogs", "Cats", "Fish & Aquatic", "Birds"],
     [["dog leash", "dog collar", "chew toy"], ["cat litter", "scratching post", "cat tree"],
      ["aquarium", "fish food", "aquarium filter"], ["birdseed", "bird cage", "perch"]],
     ["Pawsome", "Whiskerly", "Fetchwell"]),
    ("Office Products", ["Paper", "Writing", "Organization", "Desk Accessories"],
     [["notebook", "legal pad", "sticky notes"], ["ballpoint pen", "highlighter", "fountain pen"],
      ["binder", "file folder", "label maker"], ["stapler", "desk organizer", "paper clips"]],
     ["Inkwell & Co", "Deskmate", "Quillon"]),
    ("Musical Instruments", ["Guitars", "Drums & Percussion", "Wind", "Instrument Accessories"],
     [["guitar strings", "capo", "guitar pick"], ["drumsticks", "snare drum", "cymbal"],
      ["harmonica", "recorder", "flute"], ["metronome", "tuner", "music stand"]],
     ["Tonewood", "Resonix", "Fretline"]),
    ("Sports & Fitness", ["Strength Training", "Yoga", "Cardio", "Recovery"],
     [["dumbbell", "kettlebell", "barbell"], ["yoga mat", "yoga block", "yoga strap"],
      ["jump rope", "treadmill", "exercise bike"], ["foam roller", "massage ball", "resistance band"]],
     ["Ironpulse", "Zenflex", "Stridex"]),
    ("Automotive", ["Maintenance", "Interior", "Exterior Care", "Electrical"],
     [["motor oil", "oil filter", "spark plug"], ["floor mats", "seat cover", "air freshener"],
      ["car wax", "wiper blade", "car wash soap"], ["jumper cables", "headlight bulb", "battery charger"]],
     ["Torqueline", "Roadmaster Pro", "Autovance"]),
    ("Baby", ["Feeding", "Diapering", "Nursery", "Strollers & Car Seats"],
     [["baby bottle", "bib", "sippy cup"], ["diaper", "baby wipes", "changing pad"],
      ["crib sheet", "swaddle", "night light"], ["stroller", "car seat", "baby carrier"]],
     ["Littlenest", "Cuddlebug", "Tinysteps"]),
    ("Arts & Crafts", ["Painting", "Drawing", "Knitting & Crochet", "Sculpting"],
     [["watercolor set", "canvas", "paintbrush"], ["sketchbook", "charcoal pencils", "pastels"],
      ["yarn", "knitting needles", "crochet hook"], ["modeling clay", "pottery tools", "sculpting wire"]],
     ["Palettra", "Easelworks", "Craftory"]),
    ("Electronics", ["Audio", "Power & Charging", "Computer Accessories", "Networking"],
     [["headphones", "bluetooth speaker", "earbuds"], ["power bank", "usb charger", "charging cable"],
      ["wireless mouse", "keyboard", "webcam"], ["wifi router", "ethernet cable", "network switch"]],
     ["Voltaris", "Sonique", "Bytewell"]),
    ("Tools & Home Improvement", ["Hand Tools", "Power Tools", "Measuring & Layout", "Hardware"],
     [["hammer", "screwdriver", "wrench"], ["cordless drill", "circular saw", "orbital sander"],
      ["tape measure", "spirit level", "stud finder"], ["wood screws", "wall anchors", "door hinges"]],
     ["Steelhand", "Buildrite", "Forgeworks"]),
    ("Grocery & Gourmet Food", ["Coffee", "Snacks", "Pantry Staples", "Sweets"],
     [["coffee beans", "espresso", "cold brew"], ["granola bars", "almonds", "trail mix"],
      ["olive oil", "pasta", "hot sauce"], ["dark chocolate", "honey", "caramels"]],
     ["Harvest Lane", "Goldcrumb", "Orchard Table"]),
    ("Books", ["Fiction", "Cookbooks", "Reference", "Comics"],
     [["mystery novel", "fantasy novel", "thriller"], ["cookbook", "baking book", "recipe journal"],
      ["atlas", "dictionary", "encyclopedia"], ["comic book", "graphic novel", "manga"]],
     ["Lanternhouse Press", "Quillfeather Books", "Northwind Publishing"]),
]
_EXTRA_SUBTOPICS = ["Accessories", "Gift Sets"]
_ADJECTIVES = ["Premium", "Deluxe", "Classic", "Pro", "Compact", "Essential", "Everyday", "Original",
               "Heavy Duty", "Lightweight", "Professional", "Ultra", "Eco", "Vintage", "Modern"]
_TAGS = ["Pack of 2", "Set of 3", "Large", "Small", "Black", "Blue", "Red", "Gray", "Value Pack",
         "2-Pack", "Travel Size", "Gift Edition", "New Version"]
_PATTERNS = ["circle", "square", "triangle", "hstripes", "vstripes", "diamond", "cross", "rings"]
_SUMMARIES = {
    1: ["One Star", "Disappointed", "Not as described", "Broke quickly"],
    2: ["Two Stars", "Meh", "Not great", "Could be better"],
    3: ["Three Stars", "It's okay", "Average", "Does the job"],
    4: ["Four Stars", "Good value", "Pretty good", "Works well"],
    5: ["Five Stars", "Love it!", "Excellent", "Highly recommend"],
}
_REVIEWS = {
    1: "Returned this {w}. Poor quality.",
    2: "The {w} is not what I expected.",
    3: "An average {w}, nothing special.",
    4: "Nice {w}, would buy again.",
    5: "Great {w}! Exactly what I wanted.",
}


def _subtopic_name(t: int, s: int) -> str:
    subs = _TOPICS[t][1]
    return subs[s] if s < len(subs) else _EXTRA_SUBTOPICS[s - len(subs)]


def _subtopic_words(t: int, s: int) -> list[str]:
    words = _TOPICS[t][2]
    return words[s % len(words)]


def topic_names(n_topics: int) -> list[str]:
    return [_TOPICS[t][0] for t in range(n_topics)]


# ----------------------------------------------------------------------------- public API


def resolve_spec(size: str | SyntheticSpec = "small", *, seed: int | None = 2025,
                 overrides: dict | None = None) -> SyntheticSpec:
    """The spec for a size preset (or a given spec) with ``seed`` and ``overrides`` applied."""
    if isinstance(size, SyntheticSpec):
        spec = size
    else:
        if size not in SIZES:
            raise ConfigError(f"unknown synthetic size {size!r} (choose one of {', '.join(SIZES)})")
        spec = SIZES[size]
    if seed is not None:
        spec = replace(spec, seed=seed)
    if overrides:
        known = {f.name for f in fields(SyntheticSpec)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(
                f"unknown synthetic spec key(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        spec = replace(spec, **overrides)
    # normalise numeric types (numpy scalars, ints given for floats) so equal specs compare equal
    norm = {}
    for f in fields(SyntheticSpec):
        v = getattr(spec, f.name)
        if isinstance(v, np.generic):
            v = v.item()
        if f.type == "float" and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        norm[f.name] = v
    spec = SyntheticSpec(**norm)
    spec.validate()
    return spec


def generate_synthetic(out_dir: str | os.PathLike, *, size: str | SyntheticSpec = "small", seed: int = 2025,
                       overrides: dict | None = None, progress: Callable[[int], Any] | None = None) -> dict:
    """Write the synthetic dataset into ``out_dir`` (see the module docstring) and return a summary.

    Deterministic: the same spec (size + seed + overrides) gives byte-identical files.
    Idempotent: when ``out_dir/synthetic.json`` already records the same spec (and its files are
    present) nothing is written. Atomic: everything is written into a temporary folder beside
    ``out_dir`` that is renamed into place at the end. ``progress(n)``, when given, is called with
    the number of records/images written so far. ``size`` is a preset name (:data:`SIZES`) or a
    :class:`SyntheticSpec`; ``seed`` replaces the spec's seed, then ``overrides`` (spec field ->
    value) apply. Bad values raise :class:`ConfigError`; a non-empty ``out_dir`` that is not a
    synthetic dataset raises :class:`DataError` (it is never overwritten).
    """
    t0 = time.perf_counter()
    spec = resolve_spec(size, seed=seed, overrides=overrides)
    size_name = size if isinstance(size, str) else "custom"
    out = Path(out_dir)
    existing = _existing_summary(out, spec)
    if existing is not None:
        existing.update(path=str(out), generated=False, seconds=round(time.perf_counter() - t0, 3))
        return existing
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_FILE).is_file())):
        raise DataError("exists and is not a synthetic dataset folder; refusing to overwrite it", path=out)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(out.parent, prefix=f".{out.name}.tmp-")
    try:
        manifest = _generate_into(tmp, spec, size_name, progress)
        _install(tmp, out, spec)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary = dict(manifest)
    summary.update(path=str(out), generated=True, seconds=round(time.perf_counter() - t0, 3))
    return summary


def load_truth(out_dir: str | os.PathLike) -> dict:
    """The planted ground truth written with the dataset (``truth.json``)."""
    path = Path(out_dir) / TRUTH_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError("no synthetic ground truth here (not a generated synthetic dataset?)", path=path) from None


def planted_topics(out_dir: str | os.PathLike) -> dict[str, int]:
    """``{asin: topic index}`` of every item of a generated dataset (its true topic, also for
    items whose text is misleading or whose image is missing)."""
    truth = load_truth(out_dir)
    return {asin: int(info["topic"]) for asin, info in truth["items"].items()}


# ----------------------------------------------------------------------------- install / reuse


def _existing_summary(out: Path, spec: SyntheticSpec) -> dict | None:
    mf = out / MANIFEST_FILE
    if not mf.is_file():
        return None
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("version") != GENERATOR_VERSION or manifest.get("spec") != _spec_dict(spec):
        return None
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return None
    # every file as generated (an edited or damaged file would silently give another dataset):
    # a few MB for the preset sizes, so hashing them on each reuse is cheap
    for rel, digest in files.items():
        path = out / rel
        if not path.is_file() or _sha256(path) != digest:
            return None
    return manifest


def _install(tmp: Path, out: Path, spec: SyntheticSpec) -> None:
    """Rename the finished ``tmp`` folder to ``out``, replacing an older synthetic dataset."""
    old: Path | None = None
    if _existing_summary(out, spec) is not None:  # a concurrent run finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
        return
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        old.rmdir()
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        # someone else installed a dataset meanwhile: keep theirs when it is the same
        if _existing_summary(out, spec) is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- generation


def _spec_dict(spec: SyntheticSpec) -> dict:
    return {k: (float(v) if isinstance(v, float) else v) for k, v in asdict(spec).items()}


def _count(frac: float, n: int) -> int:
    """round(frac * n), but at least one when frac > 0."""
    return 0 if frac <= 0 else max(1, int(round(frac * n)))


def _generate_into(root: Path, spec: SyntheticSpec, size_name: str, progress) -> dict:
    rng = np.random.default_rng([spec.seed, 1])
    items = _make_items(spec, rng)
    users, rows = _make_interactions(spec, items, rng)
    done = 0

    def tick(k: int) -> None:
        nonlocal done
        done += k
        if progress is not None:
            progress(done)

    asins = items["asin"]
    user_ids = users["user_id"]
    (root / IMAGES_DIR).mkdir()
    meta_lines, image_hashes = _write_items(root, spec, items, tick)
    review_lines = _review_lines(spec, items, users, rows, asins, user_ids)
    _write_gz(root / META_FILE, meta_lines)
    _write_gz(root / REVIEWS_FILE, review_lines)
    tick(len(review_lines))

    truth = _truth(spec, items, users, rows)
    (root / TRUTH_FILE).write_text(json.dumps(truth, sort_keys=True, separators=(",", ":")) + "\n")
    stats = _stats(spec, items, users, rows)
    (root / README_FILE).write_text(_readme(spec, size_name, stats))

    files = {rel: _sha256(root / rel) for rel in (REVIEWS_FILE, META_FILE, TRUTH_FILE, README_FILE)}
    files.update({f"{IMAGES_DIR}/{name}": h for name, h in sorted(image_hashes.items())})
    manifest = {
        "name": DATASET_NAME,
        "generator": "moedist.data.sources.synthetic",
        "version": GENERATOR_VERSION,
        "size": size_name,
        "spec": _spec_dict(spec),
        "reviews": REVIEWS_FILE,
        "meta": META_FILE,
        "stats": stats,
        "files": files,
    }
    (root / MANIFEST_FILE).write_text(json.dumps(manifest, sort_keys=True, indent=1) + "\n")
    return manifest


def _make_items(spec: SyntheticSpec, rng: np.random.Generator) -> dict:
    I, T, S = spec.n_items, spec.n_topics, spec.n_subtopics
    # balanced topics / sub-topics, randomly assigned to asins
    perm = rng.permutation(I)
    topic = np.empty(I, np.int64)
    topic[perm] = np.arange(I) % T
    sub = np.empty(I, np.int64)
    sub[perm] = (np.arange(I) // T) % S
    # topics of unequal popularity; Zipf-like popularity within a topic
    topic_pop = (1.0 / (np.arange(T) + 1.0) ** float(spec.topic_popularity_exponent))[rng.permutation(T)]
    rank = np.empty(I, np.int64)  # popularity rank within the topic (0 = most popular)
    for t in range(T):
        members = np.flatnonzero(topic == t)
        rank[members[rng.permutation(len(members))]] = np.arange(len(members))
    weight = (rank + 1.0) ** -float(spec.popularity_exponent)
    # rare items: never sampled, given 1..4 interactions afterwards (need >= 2 regular per sub-topic)
    n_rare = _count(spec.rare_item_frac, I)
    group = topic * S + sub
    eligible = np.flatnonzero(rank >= 2)
    rare = np.zeros(I, bool)
    left = np.bincount(group, minlength=T * S)
    n_marked = 0
    for i in rng.permutation(eligible):
        if n_marked >= n_rare:
            break
        if left[group[i]] > 2:
            rare[i] = True
            left[group[i]] -= 1
            n_marked += 1
    weight = np.where(rare, 0.0, weight)
    # per-sub-topic chains ("series"): regular items ordered by popularity
    chain_next = np.full(I, -1, np.int64)
    chain_pos = np.full(I, -1, np.int64)
    for g in range(T * S):
        members = np.flatnonzero((group == g) & ~rare)
        members = members[np.argsort(rank[members], kind="stable")]
        chain_next[members[:-1]] = members[1:]
        chain_pos[members] = np.arange(len(members))
    # special items: images missing / corrupt, text misleading / missing (disjoint)
    order = rng.permutation(I)
    n_miss, n_corrupt = _count(spec.missing_image_frac, I), _count(spec.corrupt_image_frac, I)
    image_state = np.zeros(I, np.int64)  # 0 ok, 1 missing, 2 corrupt
    image_state[order[:n_miss]] = 1
    image_state[order[n_miss:n_miss + n_corrupt]] = 2
    rest = order[n_miss + n_corrupt:]
    n_mislead, n_notext = _count(spec.misleading_text_frac, I), _count(spec.missing_text_frac, I)
    text_state = np.zeros(I, np.int64)  # 0 ok, 1 misleading, 2 missing
    text_state[rest[:n_mislead]] = 1
    text_state[rest[n_mislead:n_mislead + n_notext]] = 2
    decoy = (topic + rng.integers(1, T, I)) % T
    width = max(9, len(str(I)))
    asin = np.array([f"B{i + 1:0{width}d}" for i in range(I)], dtype=object)
    return {
        "asin": asin, "topic": topic, "sub": sub, "group": group, "rank": rank, "weight": weight,
        "topic_pop": topic_pop, "rare": rare, "chain_next": chain_next, "chain_pos": chain_pos,
        "image_state": image_state, "text_state": text_state, "decoy": decoy,
    }


class _GroupSampler:
    """Vectorised weighted sampling of an item within a group (all groups at once)."""

    def __init__(self, weights: np.ndarray, groups: np.ndarray, n_groups: int):
        order = np.lexsort((np.arange(len(weights)), groups))
        g = groups[order]
        w = weights[order].astype(np.float64)
        tot = np.bincount(g, weights=w, minlength=n_groups)
        if np.any(tot <= 0):
            raise AssertionError("synthetic: a sampling group has no weight")
        start_cum = np.concatenate([[0.0], np.cumsum(tot)])[:-1]
        within = (np.cumsum(w) - start_cum[g]) / tot[g]
        # exact group ends despite rounding
        last = np.r_[g[1:] != g[:-1], True]
        within[last] = 1.0
        within = np.minimum(within, 1.0)
        self.key = g + within
        self.order = order

    def sample(self, groups: np.ndarray, u: np.ndarray) -> np.ndarray:
        u = np.minimum(u, 1.0 - 1e-9)
        idx = np.searchsorted(self.key, groups + u, side="right")
        return self.order[np.minimum(idx, len(self.order) - 1)]


def _mixture(A, B, C, f, T):
    """Users' topic mixtures (rows) at relative history position f."""
    n = len(A)
    W = np.full((n, T), 0.05 / T)
    r = np.arange(n)
    W[r, A] += 0.8 * (1.0 - f)
    W[r, B] += 0.8 * f
    W[r, C] += 0.15
    return W


def _sample_rows(W: np.ndarray, u: np.ndarray) -> np.ndarray:
    cum = np.cumsum(W, axis=1)
    x = u * cum[:, -1]
    return np.minimum((cum <= x[:, None]).sum(axis=1), W.shape[1] - 1)


def _draw_gaps(n: int, activity: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Heavy-tailed day gaps: ~40% same day, ~30% 1..6 days, ~18% 1..8 weeks, ~12% 2..10 months."""
    r = rng.random(n)
    short = rng.geometric(0.35, n).astype(np.float64)
    weeks = np.exp(rng.uniform(np.log(7), np.log(60), n))
    months = np.exp(rng.uniform(np.log(60), np.log(300), n))
    gap = np.where(r < 0.40, 0.0, np.where(r < 0.70, short, np.where(r < 0.88, weeks, months)))
    scaled = np.maximum(1.0, np.round(gap * activity))
    return np.where(gap == 0, 0, scaled).astype(np.int64)


def _make_interactions(spec: SyntheticSpec, items: dict, rng: np.random.Generator):
    U, I, T, S = spec.n_users, spec.n_items, spec.n_topics, spec.n_subtopics
    topic, group = items["topic"], items["group"]
    weight, rare_item, chain_next = items["weight"], items["rare"], items["chain_next"]
    sub_sampler = _GroupSampler(weight, group, T * S)
    topic_sampler = _GroupSampler(weight, topic, T)
    # entering a topic: bestsellers first (sharper popularity)
    entry_sampler = _GroupSampler(np.where(rare_item, 0.0, weight ** 1.5), topic, T)
    # off-topic "noise" steps come from the overall bestseller list
    global_w = weight ** 1.5 * items["topic_pop"][topic]
    global_sampler = _GroupSampler(global_w, np.zeros(I, np.int64), 1)
    flat_sampler = _GroupSampler((~rare_item).astype(np.float64), topic, T)  # collisions

    # users: history lengths, drifting topic preferences, activity, start day
    m = float(spec.mean_seq_len) - KCORE
    sigma = 0.8
    extra = rng.lognormal(np.log(max(m, 0.05)) - sigma ** 2 / 2, sigma, U)
    cap = max(KCORE, min(200, I // 4))
    length = np.minimum(KCORE + np.floor(extra + rng.random(U)).astype(np.int64), cap)
    n_rare_users = _count(spec.rare_user_frac, U)
    rare_user = np.zeros(U, bool)
    rare_user[rng.permutation(U)[:n_rare_users]] = True
    length[rare_user] = rng.integers(1, KCORE, n_rare_users)
    tp = items["topic_pop"] / items["topic_pop"].sum()
    A = rng.choice(T, U, p=tp)
    B = np.empty(U, np.int64)
    C = np.empty(U, np.int64)
    for u in range(U):  # distinct A, B, C (C = A when only two topics)
        p = tp.copy()
        p[A[u]] = 0
        B[u] = rng.choice(T, p=p / p.sum())
        if T >= 3:
            p[B[u]] = 0
            C[u] = rng.choice(T, p=p / p.sum())
        else:
            C[u] = A[u]
    start = _START_DAY + rng.integers(0, _START_SPREAD_DAYS, U)
    # long histories are lived faster, so that most fit before _END_DAY
    budget = (_END_DAY - start) / (np.maximum(length - 1, 1) * _MEAN_GAP_DAYS)
    activity = np.minimum(rng.lognormal(0.0, 0.6, U), np.maximum(budget, 0.05))

    seen: set[int] = set()
    day = start.copy()
    cur_topic = np.zeros(U, np.int64)
    last = np.full(U, -1, np.int64)
    out_u, out_i, out_day, out_step, out_gap, out_kind = [], [], [], [], [], []
    for step in range(int(length.max())):
        act = np.flatnonzero(length > step)
        n = len(act)
        f = step / np.maximum(length[act] - 1, 1)
        W = _mixture(A[act], B[act], C[act], f, T)
        if step == 0:
            gap = np.zeros(n, np.int64)
            switch = np.ones(n, bool)
        else:
            gap = _draw_gaps(n, activity[act], rng)
            p_gap = np.select([gap == 0, gap <= 7, gap <= 60], [0.05, 0.15, 0.45], 0.85)
            # interest fades: staying also needs the current topic to still be among the favourites
            r_n = np.arange(n)
            fade = np.minimum(1.0, 4.0 * W[r_n, cur_topic[act]] / W.max(axis=1))
            switch = rng.random(n) >= (1.0 - p_gap) * fade
            W[r_n[switch], cur_topic[act[switch]]] = 0.0  # a switch goes elsewhere
        day[act] += gap
        new_t = _sample_rows(W, rng.random(n))
        ct = np.where(switch, new_t, cur_topic[act])
        cur_topic[act] = ct
        lst = last[act]
        in_topic = (lst >= 0) & ~switch & (topic[np.maximum(lst, 0)] == ct)
        r = rng.random(n)
        nxt = chain_next[np.maximum(lst, 0)]
        use_chain = in_topic & (r < 0.45) & (nxt >= 0)
        use_sub = in_topic & ~use_chain & (r < 0.75)
        noise = rng.random(n) < 0.03
        item = topic_sampler.sample(ct, rng.random(n))
        item = np.where(switch, entry_sampler.sample(ct, rng.random(n)), item)
        item = np.where(use_sub, sub_sampler.sample(group[np.maximum(lst, 0)], rng.random(n)), item)
        item = np.where(use_chain, nxt, item)
        kind = np.where(use_chain, 1, np.where(use_sub, 2, 0))
        item = np.where(noise, global_sampler.sample(np.zeros(n, np.int64), rng.random(n)), item)
        kind = np.where(noise, 3, kind)
        # no repeated (user, item): resample within the topic, then anywhere
        codes = act * I + item
        bad = np.fromiter((c in seen for c in codes.tolist()), bool, n)
        for attempt in range(6):
            if not bad.any():
                break
            b = np.flatnonzero(bad)
            if attempt < 2:
                item[b] = topic_sampler.sample(ct[b], rng.random(len(b)))
            elif attempt < 5:
                item[b] = flat_sampler.sample(ct[b], rng.random(len(b)))
            else:
                item[b] = global_sampler.sample(np.zeros(len(b), np.int64), rng.random(len(b)))
            kind[b] = 4
            codes[b] = act[b] * I + item[b]
            bad[b] = np.fromiter((c in seen for c in codes[b].tolist()), bool, len(b))
        for j in np.flatnonzero(bad):  # last resort: an unseen regular item, of the topic if any
            uid = int(act[j])
            cand = [i for i in rng.permutation(I).tolist() if not rare_item[i] and uid * I + i not in seen]
            same = [i for i in cand if topic[i] == ct[j]]
            item[j] = (same or cand)[0]
            codes[j] = uid * I + item[j]
        seen.update(codes.tolist())
        last[act] = item
        out_u.append(act)
        out_i.append(item)
        out_day.append(day[act].copy())
        out_step.append(np.full(n, step, np.int64))
        out_gap.append(gap)
        out_kind.append(kind)

    rows = {
        "user": np.concatenate(out_u), "item": np.concatenate(out_i), "day": np.concatenate(out_day),
        "step": np.concatenate(out_step).astype(np.float64), "gap": np.concatenate(out_gap),
        "kind": np.concatenate(out_kind),
    }
    _fit_time_window(rows, start)
    rows = _fix_item_counts(spec, items, rows, rare_user, A, B, C, seen, rng)
    rows = _add_duplicates(spec, rows, ~rare_user[rows["user"]] & ~items["rare"][rows["item"]], rng)
    # ratings follow the user's current preference for the item's topic
    f = rows["step"] / np.maximum(length[rows["user"]] - 1, 1)
    Wr = _mixture(A[rows["user"]], B[rows["user"]], C[rows["user"]], np.minimum(f, 1.0), T)
    pref = Wr[np.arange(len(f)), topic[rows["item"]]] / Wr.max(axis=1)
    noise = rng.normal(0.0, 0.7, len(f))
    rows["rating"] = np.clip(np.round(2.4 + 2.6 * pref + noise), 1, 5).astype(np.int64)
    rows["verified"] = rng.random(len(f)) < 0.9
    rows["has_text"] = rng.random(len(f)) >= 0.02
    rows["phrase"] = rng.integers(0, 4, len(f))
    # chronological file order; a user's same-day interactions keep the planted order
    user_rank = rng.permutation(U)
    order = np.lexsort((rows["step"], user_rank[rows["user"]], rows["day"]))
    rows = {k: v[order] for k, v in rows.items()}
    width = max(4, len(str(U)))
    users = {
        "user_id": np.array([f"U{u + 1:0{width}d}" for u in range(U)], dtype=object),
        "A": A, "B": B, "C": C, "length": length, "rare": rare_user, "activity": activity, "start": start,
    }
    return users, rows


def _fit_time_window(rows: dict, start: np.ndarray) -> None:
    """Move histories that run past _END_DAY earlier (gaps kept), down to _EARLIEST_DAY, and
    compress the few that are still too long."""
    user, day = rows["user"], rows["day"]
    end = np.full(len(start), -1, np.int64)
    np.maximum.at(end, user, day)
    shift = np.maximum(end - _END_DAY, 0)
    new_start = start - shift
    over = new_start < _EARLIEST_DAY
    span = np.maximum(end - start, 1)
    factor = np.where(over, (_END_DAY - _EARLIEST_DAY) / span, 1.0)
    new_start = np.where(over, _EARLIEST_DAY, new_start)
    rows["day"] = new_start[user] + np.floor((day - start[user]) * factor[user]).astype(np.int64)


def _fix_item_counts(spec: SyntheticSpec, items: dict, rows: dict, rare_user: np.ndarray, A, B, C,
                     seen: set, rng: np.random.Generator) -> dict:
    """Make the 5-core exactly "everything but the planted rare users and items".

    Every regular item gets >= 5 interactions from regular users, by re-pointing rows (of regular
    users) of well-covered items of the same sub-topic (then topic, then anywhere): a user's
    count is unchanged. Every rare item gets 1..4 *extra* rows, inserted into histories of regular
    users (preferably ones that like its topic), so no regular user loses an interaction."""
    I = spec.n_items
    item, user = rows["item"], rows["user"]
    group, topic, rare = items["group"], items["topic"], items["rare"]
    regular_row = ~rare_user[user]
    counts = np.bincount(item[regular_row], minlength=I)
    need = np.flatnonzero((counts < KCORE) & ~rare)
    locked = ~regular_row
    by_group = {int(g): np.flatnonzero(group[item] == g) for g in np.unique(group[need])}
    for j in need[rng.permutation(len(need))]:
        for scope in ("group", "topic", "all"):
            if counts[j] >= KCORE:
                break
            if scope == "group":
                cand = by_group[int(group[j])]
            elif scope == "topic":
                cand = np.flatnonzero(topic[item] == topic[j])
            else:
                cand = np.arange(len(item))
            cand = cand[(~locked[cand]) & (counts[item[cand]] > KCORE) & ~rare[item[cand]]]
            # take from the least popular well-covered items first (keeps the popularity skew)
            cand = cand[rng.permutation(len(cand))]
            cand = cand[np.argsort(counts[item[cand]], kind="stable")]
            for r in cand.tolist():
                if counts[j] >= KCORE:
                    break
                code = int(user[r]) * I + int(j)
                if code in seen or counts[item[r]] <= KCORE:
                    continue
                seen.discard(int(user[r]) * I + int(item[r]))
                seen.add(code)
                counts[item[r]] -= 1
                item[r] = j
                counts[j] += 1
                locked[r] = True
                rows["kind"][r] = 5
        if counts[j] < KCORE:  # pragma: no cover - only for degenerate specs
            raise AssertionError(f"synthetic: could not give item {j} {KCORE} interactions")

    # rare items: extra rows right after a random interaction of a regular user
    rare_items = np.flatnonzero(rare)
    regular_users = np.flatnonzero(~rare_user)
    rows_of = {}
    for r, u in enumerate(user.tolist()):
        rows_of.setdefault(u, []).append(r)
    new_rows = []
    for j in rare_items.tolist():
        k = int(rng.integers(1, KCORE))
        t = topic[j]
        likes = regular_users[(A[regular_users] == t) | (B[regular_users] == t) | (C[regular_users] == t)]
        pool = np.concatenate([rng.permutation(likes), rng.permutation(regular_users)])
        placed = 0
        for u in pool.tolist():
            if placed == k:
                break
            if u * I + j in seen:
                continue
            seen.add(u * I + j)
            r = rows_of[u][int(rng.integers(len(rows_of[u])))]
            new_rows.append((u, j, rows["day"][r], rows["step"][r] + 0.25))
            placed += 1
    if not new_rows:
        return rows
    nu, ni, nd, ns = (np.array(c) for c in zip(*new_rows))
    extra = {"user": nu.astype(np.int64), "item": ni.astype(np.int64), "day": nd.astype(np.int64),
             "step": ns.astype(np.float64), "gap": np.zeros(len(nu), np.int64), "kind": np.full(len(nu), 5)}
    return {k: np.concatenate([rows[k], extra[k]]) for k in rows}


def _add_duplicates(spec: SyntheticSpec, rows: dict, eligible: np.ndarray, rng: np.random.Generator) -> dict:
    """Plant repeated (user, item) interactions: an earlier item of the user again at a later
    step (only for ``eligible`` rows: regular users and items, so the 5-core is unchanged)."""
    n = len(rows["item"])
    n_dup = min(int(round(spec.duplicate_frac * n)), int(eligible.sum()))
    if n_dup == 0:
        return rows
    order = np.lexsort((rows["step"], rows["user"]))
    u_sorted = rows["user"][order]
    ends = np.searchsorted(u_sorted, u_sorted, side="right")
    src = rng.choice(np.flatnonzero(eligible[order]), n_dup, replace=False)  # positions in user order
    later = src + (rng.random(n_dup) * (ends[src] - src)).astype(np.int64)  # same user, at/after src
    s_idx, l_idx = order[src], order[later]
    new = {
        "user": rows["user"][s_idx], "item": rows["item"][s_idx], "day": rows["day"][l_idx],
        "step": rows["step"][l_idx] + 0.5, "gap": np.zeros(n_dup, np.int64), "kind": np.full(n_dup, 6),
    }
    return {k: np.concatenate([rows[k], new[k]]) for k in rows}


# ----------------------------------------------------------------------------- items: text + images


def _title(t: int, s: int, r: np.random.Generator) -> tuple[str, str | None, str]:
    """(title, brand or None, main word) for an item of topic t / sub-topic s."""
    words = _subtopic_words(t, s)
    all_words = [w for ws in _TOPICS[t][2] for w in ws]
    main = words[int(r.integers(len(words)))] if r.random() < 0.85 else all_words[int(r.integers(len(all_words)))]
    brands = _TOPICS[t][3]
    brand = brands[int(r.integers(len(brands)))] if r.random() < 0.9 else None
    parts = []
    if brand is not None and r.random() < 0.85:
        parts.append(brand)
    if r.random() < 0.6:
        parts.append(_ADJECTIVES[int(r.integers(len(_ADJECTIVES)))])
    parts.append(main.title())
    title = " ".join(parts)
    if r.random() < 0.25:
        other = all_words[int(r.integers(len(all_words)))]
        if other != main:
            title += f" with {other.title()}"
    if r.random() < 0.5:
        title += ", " + _TAGS[int(r.integers(len(_TAGS)))]
    return title, brand, main


def _item_meta(spec: SyntheticSpec, items: dict, i: int) -> tuple[dict, str]:
    r = np.random.default_rng([spec.seed, 2, i])
    t, s = int(items["topic"][i]), int(items["sub"][i])
    state = int(items["text_state"][i])
    rec: dict[str, Any] = {"asin": items["asin"][i], "main_cat": STORE_NAME}
    main = _subtopic_words(t, s)[0]
    if state == 2:  # missing text
        rec["category"] = [STORE_NAME]
    else:
        tt, ss = (t, s) if state == 0 else (int(items["decoy"][i]), int(r.integers(spec.n_subtopics)))
        title, brand, main = _title(tt, ss, r)
        rec["title"] = title
        if brand is not None:
            rec["brand"] = brand
        rec["category"] = [STORE_NAME, _TOPICS[tt][0], _subtopic_name(tt, ss)]
        desc = [f"This {main} is a great pick for anyone into {_TOPICS[tt][0].lower()}."]
        if r.random() < 0.5:
            desc.append(f"Part of our {_subtopic_name(tt, ss).lower()} collection.")
        rec["description"] = desc
    rec["price"] = f"${r.uniform(3, 120):.2f}"
    img = int(items["image_state"][i])
    if img == 1:
        if i % 2 == 0:
            rec["imageURL"] = []
            rec["imageURLHighRes"] = []
    else:
        path = f"{IMAGES_DIR}/{items['asin'][i]}.jpg"
        rec["imageURL"] = [path]
        rec["imageURLHighRes"] = [path]
    return rec, main


def _rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    rr, gg, bb = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return int(round(rr * 255)), int(round(gg * 255)), int(round(bb * 255))


def _draw_image(spec: SyntheticSpec, t: int, s: int, i: int) -> bytes:
    from PIL import Image, ImageDraw

    r = np.random.default_rng([spec.seed, 3, i])
    n = spec.image_size
    hue = t / spec.n_topics + r.uniform(-0.01, 0.01)
    bg = _rgb(hue, r.uniform(0.68, 0.85), r.uniform(0.8, 0.92))
    fg = _rgb(hue + r.uniform(-0.015, 0.015), r.uniform(0.85, 1.0), r.uniform(0.32, 0.42))
    im = Image.new("RGB", (n, n), bg)
    d = ImageDraw.Draw(im)
    pattern = _PATTERNS[t % len(_PATTERNS)]
    # the sub-topic sets the number of shapes (stripes); the total shape area stays about the same
    k = s + 1
    if pattern in ("hstripes", "vstripes"):
        stripes = 2 + s
        w = max(1.0, n * 0.3 / stripes * r.uniform(0.85, 1.15))
        off = r.uniform(0, n / (2 * stripes + 1))
        for j in range(stripes):
            a = off + (2 * j + 1) * n / (2 * stripes + 1)
            box = [0, a, n - 1, a + w] if pattern == "hstripes" else [a, 0, a + w, n - 1]
            d.rectangle(box, fill=fg)
    else:
        cols = int(np.ceil(np.sqrt(k)))
        rows_ = int(np.ceil(k / cols))
        rad = n * 0.2 / np.sqrt(k) * r.uniform(0.85, 1.15)
        for j in range(k):
            cx = (j % cols + 0.5) * n / cols + r.uniform(-0.06, 0.06) * n
            cy = (j // cols + 0.5) * n / rows_ + r.uniform(-0.06, 0.06) * n
            box = [cx - rad, cy - rad, cx + rad, cy + rad]
            if pattern == "circle":
                d.ellipse(box, fill=fg)
            elif pattern == "square":
                d.rectangle(box, fill=fg)
            elif pattern == "triangle":
                d.polygon([(cx, cy - rad), (cx - rad, cy + rad), (cx + rad, cy + rad)], fill=fg)
            elif pattern == "diamond":
                d.polygon([(cx, cy - rad), (cx + rad, cy), (cx, cy + rad), (cx - rad, cy)], fill=fg)
            elif pattern == "cross":
                th = max(1.0, rad / 3)
                d.rectangle([cx - rad, cy - th, cx + rad, cy + th], fill=fg)
                d.rectangle([cx - th, cy - rad, cx + th, cy + rad], fill=fg)
            else:  # rings
                d.ellipse(box, outline=fg, width=max(1, int(rad / 4)))
                d.ellipse([cx - rad / 2.5, cy - rad / 2.5, cx + rad / 2.5, cy + rad / 2.5], fill=fg)
    # per-item clutter: a few thin lines and dots of any colour
    for _ in range(int(r.integers(2, 6))):
        x0, y0, x1, y1 = (float(v) for v in r.uniform(0, n, 4))
        d.line([x0, y0, x1, y1], fill=_rgb(r.random(), r.uniform(0, 1), r.uniform(0.2, 1)), width=1)
    for _ in range(int(r.integers(0, 8))):
        x, y = (float(v) for v in r.uniform(0, n, 2))
        d.point((x, y), fill=_rgb(r.random(), r.uniform(0, 1), r.uniform(0, 1)))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=JPEG_QUALITY)
    data = buf.getvalue()
    return data


def _corrupt(data: bytes, i: int, seed: int) -> bytes:
    """A broken image file: a truncated JPEG (even items) or bytes that are no image (odd)."""
    if i % 2 == 0:
        return data[: max(64, len(data) // 3)]
    r = np.random.default_rng([seed, 4, i])
    return b"<html>404 Not Found</html>\n" + r.integers(0, 256, 256, dtype=np.uint8).tobytes()


def _write_items(root: Path, spec: SyntheticSpec, items: dict, tick) -> tuple[list[str], dict[str, str]]:
    lines: list[str] = []
    hashes: dict[str, str] = {}
    mains: list[str] = []
    I = spec.n_items
    for i in range(I):
        rec, main = _item_meta(spec, items, i)
        mains.append(main)
        lines.append(json.dumps(rec, sort_keys=True))
        state = int(items["image_state"][i])
        if state != 1:
            data = _draw_image(spec, int(items["topic"][i]), int(items["sub"][i]), i)
            if state == 2:
                data = _corrupt(data, i, spec.seed)
            name = f"{items['asin'][i]}.jpg"
            (root / IMAGES_DIR / name).write_bytes(data)
            hashes[name] = hashlib.sha256(data).hexdigest()
        if (i + 1) % 500 == 0:
            tick(500)
    tick(I % 500)
    items["main_word"] = np.array(mains, dtype=object)
    return lines, hashes


# ----------------------------------------------------------------------------- reviews + files

_REVIEW_TIME_CACHE: dict[int, str] = {}


def _review_time(day: int) -> str:
    s = _REVIEW_TIME_CACHE.get(day)
    if s is None:
        d = _dt.date(1970, 1, 1) + _dt.timedelta(days=int(day))
        s = f"{d.month:02d} {d.day}, {d.year}"
        _REVIEW_TIME_CACHE[day] = s
    return s


def _review_lines(spec, items, users, rows, asins, user_ids) -> list[str]:
    dumps = json.dumps
    main = items["main_word"]
    out = []
    for u, i, day, rating, ver, has_text, ph in zip(
        rows["user"].tolist(), rows["item"].tolist(), rows["day"].tolist(), rows["rating"].tolist(),
        rows["verified"].tolist(), rows["has_text"].tolist(), rows["phrase"].tolist(),
    ):
        rec = {
            "asin": asins[i], "overall": float(rating), "reviewTime": _review_time(day), "reviewerID": user_ids[u],
            "summary": _SUMMARIES[rating][ph], "unixReviewTime": day * 86400, "verified": ver,
        }
        if has_text:
            rec["reviewText"] = _REVIEWS[rating].format(w=main[i])
        out.append(dumps(rec, sort_keys=True))
    return out


def _write_gz(path: Path, lines: list[str]) -> None:
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz:
        chunk = 20000
        for k in range(0, len(lines), chunk):
            gz.write(("\n".join(lines[k:k + chunk]) + "\n").encode("utf-8"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _truth(spec, items, users, rows) -> dict:
    names = topic_names(spec.n_topics)
    img_state = ["ok", "missing", "corrupt"]
    txt_state = ["ok", "misleading", "missing"]
    counts = np.bincount(rows["item"], minlength=spec.n_items)
    it = {}
    for i in range(spec.n_items):
        it[items["asin"][i]] = {
            "topic": int(items["topic"][i]), "subtopic": int(items["sub"][i]),
            "popularity_rank": int(items["rank"][i]), "chain_pos": int(items["chain_pos"][i]),
            "image": img_state[int(items["image_state"][i])], "text": txt_state[int(items["text_state"][i])],
            "rare": bool(items["rare"][i]), "n_interactions": int(counts[i]),
        }
    us = {}
    for u in range(spec.n_users):
        us[users["user_id"][u]] = {
            "start_topic": int(users["A"][u]), "end_topic": int(users["B"][u]), "minor_topic": int(users["C"][u]),
            "rare": bool(users["rare"][u]),
        }
    return {
        "spec": _spec_dict(spec),
        "topics": names,
        "subtopics": [[_subtopic_name(t, s) for s in range(spec.n_subtopics)] for t in range(spec.n_topics)],
        "patterns": [_PATTERNS[t % len(_PATTERNS)] for t in range(spec.n_topics)],
        "hues": [round(t / spec.n_topics, 6) for t in range(spec.n_topics)],
        "items": it,
        "users": us,
    }


def _stats(spec, items, users, rows) -> dict:
    n = len(rows["item"])
    u_counts = np.bincount(rows["user"], minlength=spec.n_users)
    i_counts = np.bincount(rows["item"], minlength=spec.n_items)
    ts = rows["day"] * 86400
    kinds = np.bincount(rows["kind"], minlength=7)
    top = np.sort(i_counts)[::-1][: max(1, spec.n_items // 10)].sum() / max(n, 1)
    return {
        "n_users": spec.n_users,
        "n_items": spec.n_items,
        "n_interactions": int(n),
        "n_topics": spec.n_topics,
        "n_subtopics": spec.n_subtopics,
        "users_below_5": int((u_counts < KCORE).sum()),
        "items_below_5": int((i_counts < KCORE).sum()),
        "items_missing_image": int((items["image_state"] == 1).sum()),
        "items_corrupt_image": int((items["image_state"] == 2).sum()),
        "items_misleading_text": int((items["text_state"] == 1).sum()),
        "items_missing_text": int((items["text_state"] == 2).sum()),
        "duplicate_interactions": int(kinds[6]),
        "chain_steps": int(kinds[1]),
        "same_subtopic_steps": int(kinds[2]),
        "noise_steps": int(kinds[3]),
        "top10pct_item_share": round(float(top), 4),
        "first_timestamp": int(ts.min()),
        "last_timestamp": int(ts.max()),
        "mean_rating": round(float(rows["rating"].mean()), 4),
    }


def _readme(spec: SyntheticSpec, size_name: str, stats: dict) -> str:
    names = topic_names(spec.n_topics)
    first = _dt.datetime.fromtimestamp(stats["first_timestamp"], _dt.timezone.utc).date()
    last = _dt.datetime.fromtimestamp(stats["last_timestamp"], _dt.timezone.utc).date()
    topics = "\n".join(
        f"  {t:2d}. {names[t]:<26} hue {t / spec.n_topics:.3f}, pattern {_PATTERNS[t % len(_PATTERNS)]:<8} "
        f"sub-topics: {', '.join(_subtopic_name(t, s) for s in range(spec.n_subtopics))}"
        for t in range(spec.n_topics)
    )
    return f"""moedist synthetic dataset (generator version {GENERATOR_VERSION})
=================================================

Size preset: {size_name}    seed: {spec.seed}
Spec: {json.dumps(_spec_dict(spec), sort_keys=True)}

Files (Amazon Reviews 2018 format)
  {REVIEWS_FILE:<24} reviews, gzip JSON lines: reviewerID, asin, overall, unixReviewTime,
  {'':<24} reviewTime, verified, summary, reviewText (absent in ~2%); chronological order,
  {'':<24} a user's same-day reviews in their planted order.
  {META_FILE:<24} item metadata, gzip JSON lines: asin, title, brand, category,
  {'':<24} description, imageURL / imageURLHighRes (paths relative to this folder), price.
  {IMAGES_DIR + '/<asin>.jpg':<24} {spec.image_size}x{spec.image_size} JPEG images (quality {JPEG_QUALITY}).
  {TRUTH_FILE:<24} planted ground truth (item topics, sub-topics, chains; user topic drift).
  {MANIFEST_FILE:<24} spec and sha256 of every file.

Statistics
  users {stats['n_users']:,}, items {stats['n_items']:,}, interactions {stats['n_interactions']:,}
  dates {first} .. {last} (Unix seconds at midnight UTC)
  users with < 5 interactions: {stats['users_below_5']}, items with < 5: {stats['items_below_5']}
  items without image: {stats['items_missing_image']}, with a corrupt image file: {stats['items_corrupt_image']}
  items with misleading text: {stats['items_misleading_text']}, with no text: {stats['items_missing_text']}
  repeated (user, item) interactions: {stats['duplicate_interactions']}
  share of interactions on the top 10% items: {stats['top10pct_item_share']:.1%}

Planted structure
  Topics ({spec.n_topics}, each with {spec.n_subtopics} sub-topics):
{topics}
  Images: background = the topic hue (jitter +-0.01, saturation 0.68-0.85, value 0.8-0.92)
    with the topic's shape pattern in a dark shade of the same hue; sub-topic k (0-based) has
    k + 1 shapes (k + 2 stripes) of about the same total area; a few random lines and dots per
    item. The mean colour alone identifies the topic.
  Text: title = [topic brand] [adjective] <sub-topic word> [with <topic word>] [, tag];
    category = ["{STORE_NAME}", <topic>, <sub-topic>]. {stats['items_misleading_text']} items describe
    another topic (title, brand, category); {stats['items_missing_text']} have no title/brand/description
    and category ["{STORE_NAME}"]. Text and image problems never hit the same item.
  Users: topic mixture at relative position f of the history
    0.8 * ((1 - f) * start_topic + f * end_topic) + 0.15 * minor_topic + 0.05 * uniform.
  Sequences: a step stays in the current topic unless the user switches. A switch happens with
    a probability that grows with the time gap (5% same day, 15% <= 1 week, 45% <= 2 months,
    85% longer) and also when interest has faded (the stay probability is multiplied by
    min(1, 4 * weight(current topic) / weight(top topic))); a switch always changes topic,
    drawn from the mixture. Within the topic: 45% the next item of the last item's sub-topic
    chain (items of a sub-topic ordered by popularity), 30% another item of the same
    sub-topic, else an item of the topic by popularity; 3% of steps are off-topic picks from
    the overall bestseller list. A user never gets the same item twice (unless duplicates are
    planted: duplicate_frac re-emits an earlier item at a later step).
  k-core: {stats['users_below_5']} users have 1-4 interactions and {stats['items_below_5']} items have 1-4
    (inserted into histories of regular users); without them every other user and item still
    has >= 5, so the 5-core is exactly "all but these". Regular items short of 5 got rows
    re-pointed from well-covered items of the same sub-topic.
  Time: per-user start between 2013-01-01 and 2015-12-31; gaps ~40% same day, ~30% 1-6 days,
    ~18% 1-8 weeks, ~12% 2-10 months, times a per-user activity factor (lognormal, lower for
    long histories); histories that would run past 2018-09-30 start earlier (from 2008-01-01).
  Popularity: Zipf (exponent {spec.popularity_exponent}) within each topic; topic popularity ~
    rank^-{spec.topic_popularity_exponent}; entering a topic picks from its bestsellers (weights ^1.5), and noise
    steps come from the overall bestseller list.
  Ratings: round(2.4 + 2.6 * preference + N(0, 0.7)) clipped to 1..5, preference = the user's
    current mixture weight of the item's topic relative to their top topic.
"""


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - convenience entry point
    import argparse

    ap = argparse.ArgumentParser(description="Generate the moedist synthetic dataset")
    ap.add_argument("out")
    ap.add_argument("--size", default="small", choices=sorted(SIZES))
    ap.add_argument("--seed", type=int, default=2025)
    args = ap.parse_args(argv)
    summary = generate_synthetic(args.out, size=args.size, seed=args.seed)
    print(json.dumps({k: summary[k] for k in ("path", "generated", "seconds", "stats")}, indent=1))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
