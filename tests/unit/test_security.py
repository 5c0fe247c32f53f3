"""Hostile inputs are refused before they cost memory or reach other hosts: decompression bombs in
raw data lines, sparse tar entries in feature shards, image redirects to non-http(s) schemes; and
the local Ray that feature extraction starts keeps its authentication."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import socket
import stat
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moedist.data.sources import amazon
from moedist.errors import DataError
from moedist.features import store
from moedist.features.images import ImageFetcher

# ----------------------------------------------------------------------------- raw data lines


def test_a_line_longer_than_the_limit_is_refused_not_buffered(tmp_path, monkeypatch):
    monkeypatch.setattr(amazon, "MAX_LINE_BYTES", 1000, raising=False)
    ok = b'{"asin": "A"}\n'
    for name, opener in (("bomb.json.gz", gzip.open), ("long.json", open)):
        path = tmp_path / name
        with opener(path, "wb") as f:
            f.write(ok + ok + b" " * 1_000_000)  # a 1 MB third line without newline
        got = []
        with pytest.raises(DataError, match=r"bomb\.json\.gz:3: line longer than 1,000 bytes" if opener is gzip.open
                           else r"long\.json:3: line longer than 1,000 bytes"):
            for n, raw in amazon.iter_lines(path):
                got.append((n, raw))
        assert got == [(1, ok), (2, ok)]
    # a line of exactly the limit (newline included) is fine, and the last line needs no newline
    path = tmp_path / "edge.json"
    path.write_bytes(b"x" * 999 + b"\n" + b"y" * 1000)
    assert [(n, len(r)) for n, r in amazon.iter_lines(path)] == [(1, 1000), (2, 1000)]


def test_the_default_line_limit_leaves_room_for_real_records():
    assert 8 * 1024 * 1024 <= amazon.MAX_LINE_BYTES <= 1024 * 1024 * 1024


# ----------------------------------------------------------------------------- feature shards


def _sparse_header(name: str, realsize: int) -> bytes:
    """An old-GNU sparse tar header: no data on disk, ``realsize`` bytes when read."""
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.GNUTYPE_SPARSE
    ti.size = 0
    buf = bytearray(ti.tobuf(format=tarfile.GNU_FORMAT))
    buf[483:495] = tarfile.itn(realsize, 12, tarfile.GNU_FORMAT)
    buf[148:156] = b" " * 8
    buf[148:156] = b"%06o\0 " % tarfile.calc_chksums(bytes(buf))[0]
    return bytes(buf)


def _plant(folder, shard_bytes: bytes) -> None:
    """Replace shard 0 and give the manifest its checksum (whoever plants a shard writes the manifest too)."""
    (folder / store.shard_name(0)).write_bytes(shard_bytes)
    m = json.loads((folder / store.MANIFEST).read_text())
    m["shards"][0]["sha256"] = hashlib.sha256(shard_bytes).hexdigest()
    (folder / store.MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize("entry", ["000000001.text.npy", "000000001.meta.json"])
def test_a_sparse_shard_entry_is_refused_before_it_is_read(tmp_path, entry):
    out = tmp_path / "feat"
    store.write_feature_arrays(out, item_ids=["a"], arrays={"text": np.ones((1, 4), np.float32)}, shard_size=1)
    # 1.5 KB on disk, 64 MiB when read (a few GB just as cheaply)
    _plant(out, _sparse_header(entry, 64 * 1024 * 1024) + b"\0" * 1024)
    with pytest.raises(DataError, match=r"shard-000000\.tar: sparse entry .* claims 67,108,864 bytes"):
        store.load_item_features(out)
    if entry.endswith(".meta.json"):
        with pytest.raises(DataError, match="sparse entry"):
            store.read_shard_missing(out / store.shard_name(0))


def test_an_oversized_shard_entry_is_refused_and_other_modalities_are_not_read(tmp_path):
    out = tmp_path / "feat"
    store.write_feature_arrays(out, item_ids=["a"], arrays={"text": np.ones((1, 4), np.float32),
                                                             "image": np.ones((1, 2), np.float32)}, shard_size=1)
    shard = out / store.shard_name(0)
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    big = io.BytesIO()
    np.save(big, np.zeros(100_000, np.float32), allow_pickle=False)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            if m.name.endswith(".image.npy"):
                data = big.getvalue()
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    _plant(out, buf.getvalue())
    with pytest.raises(DataError, match=r"entry '000000001\.image\.npy' claims 400,128 bytes"):
        store.load_item_features(out)
    feats = store.load_item_features(out, modalities=["text"])  # the image entry is never read
    assert feats.features["text"][1].tolist() == [1.0] * 4


# ----------------------------------------------------------------------------- image redirects


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture()
def redirector():
    """A loopback HTTP server: ``/to?<url>`` redirects (302) to ``<url>``, ``/img.jpg`` is a JPEG;
    and a bare TCP listener (``listener``) that counts who connects to it."""
    body = _jpeg()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            if self.path.startswith("/to?"):
                self.send_response(302)
                self.send_header("Location", self.path[4:])
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    hits = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            hits.append(1)
            conn.close()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", listener.getsockname()[1], hits
    stop.set()
    t.join(2)
    listener.close()
    srv.shutdown()
    srv.server_close()


def test_image_redirects_are_followed_to_http_only(redirector, tmp_path):
    base, port, hits = redirector
    f = ImageFetcher(retries=0, timeout=3)
    img, reason = f.load(f"{base}/to?{base}/img.jpg")  # http -> http: followed
    assert reason is None and img.size == (8, 8)
    # http -> ftp://<any host:port>: refused without connecting (urllib's default handler follows it)
    assert f.load(f"{base}/to?ftp://127.0.0.1:{port}/x.jpg") == (None, "bad_source")
    assert f.load(f"{base}/to?FTP://127.0.0.1:{port}/x.jpg") == (None, "bad_source")
    assert hits == []
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(_jpeg())
    img, reason = f.load(f"{base}/to?{secret.as_uri()}")  # never a local file through a redirect
    assert img is None and reason in ("bad_source", "http_error")


# ----------------------------------------------------------------------------- local Ray


def test_extraction_never_turns_ray_auth_off_for_the_cluster_it_starts(monkeypatch):
    """A local Ray's GCS and raylets listen on every interface, not loopback (checked with
    ``ss -ltnp``: ``*:<gcs port>``); without token auth anyone who reaches the host can connect a
    driver and run code. Ray enables token auth for a new local cluster unless told otherwise."""
    import sys
    import types

    from moedist.features import pipeline

    seen = {}
    fake = types.SimpleNamespace(is_initialized=lambda: False,
                                 init=lambda **kw: seen.update(kw, auth=os.environ.get("RAY_AUTH_MODE")))
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert pipeline._ensure_ray(None) is True
    assert "num_cpus" in seen and seen["auth"] is None  # Ray's own default (token) applies
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    pipeline._ensure_ray(None)
    assert seen["auth"] == "token"


@pytest.fixture
def ray_home(tmp_path, monkeypatch):
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_a_missing_ray_token_is_created_private(ray_home):
    from moedist.ray_auth import private_auth_token

    path = private_auth_token()
    assert path == ray_home / ".ray" / "auth_token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    token = path.read_text()
    assert len(token) == 64 and int(token, 16) >= 0  # Ray's format: 256 random bits as hex
    assert private_auth_token() == path and path.read_text() == token  # an existing token is kept


def test_a_ray_token_readable_by_others_is_made_private(ray_home, monkeypatch):
    from moedist.ray_auth import private_auth_token

    (ray_home / ".ray").mkdir()
    path = ray_home / ".ray" / "auth_token"
    path.write_text("a" * 64)
    path.chmod(0o644)  # as Ray writes it under the usual umask
    said = []
    assert private_auth_token(said.append) == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == "a" * 64
    assert said and "0600" in said[0]
    other = ray_home / "elsewhere" / "token"  # RAY_AUTH_TOKEN_PATH is where Ray reads it from then
    other.parent.mkdir()
    other.write_text("b" * 64)
    other.chmod(0o640)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(other))
    assert private_auth_token() == other and stat.S_IMODE(other.stat().st_mode) == 0o600


@pytest.mark.parametrize("env", [{"RAY_AUTH_MODE": "disabled"}, {"RAY_AUTH_TOKEN": "c" * 64}])
def test_no_token_file_when_auth_is_off_or_the_token_is_given(ray_home, monkeypatch, env):
    from moedist.ray_auth import private_auth_token

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert private_auth_token() is None
    assert not (ray_home / ".ray").exists()


@pytest.mark.integration
def test_the_local_ray_moedist_starts_uses_a_private_token(tmp_path):
    """A real local Ray started by the trainer's launcher, with a fresh HOME: the token file it
    authenticates with is mode 0600 (Ray alone would write it 0644 under umask 022), and a task
    runs, so Ray accepted the token written for it."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    env.update(HOME=str(tmp_path))
    code = (
        "import os, ray\n"
        "os.umask(0o022)\n"
        "from moedist.train.config import ExperimentConfig\n"
        "from moedist.train.launch import init_ray\n"
        "assert init_ray(ExperimentConfig(), num_cpus=2, log_to_driver=False)\n"
        "try:\n"
        "    print('auth', os.environ.get('RAY_AUTH_MODE'), ray.get(ray.remote(lambda: 41 + 1).remote()))\n"
        "finally:\n"
        "    ray.shutdown()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=str(Path(__file__).resolve().parents[2]))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "auth token 42" in out.stdout, out.stdout
    path = tmp_path / ".ray" / "auth_token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_text().strip()) == 64
