"""Image loading: local files and URLs from a loopback HTTP server (good, 404, slow, truncated,
non-image, flaky), failing soft with a reason, retries, bounded concurrency and the disk cache."""
from __future__ import annotations

import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from moedist.features.images import REASONS, ImageFetcher, decode_image, load_image, url_cache_path


def _jpeg(seed: int = 0, size=(24, 32)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


GOOD = _jpeg(1)
OTHER = _jpeg(2)


class _Server:
    """A loopback HTTP server whose paths misbehave in known ways; counts requests per path."""

    def __init__(self):
        self.hits: dict[str, int] = {}
        self.inflight = 0
        self.max_inflight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep pytest output clean
                pass

            def _send(self, code, body: bytes, ctype="image/jpeg", length=None):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                path = self.path.split("?")[0]
                counted = path.startswith("/good-")  # concurrency is measured on these only
                with server.lock:
                    n = server.hits[path] = server.hits.get(path, 0) + 1
                    server.inflight += counted
                    server.max_inflight = max(server.max_inflight, server.inflight)
                try:
                    if path.startswith("/good"):
                        time.sleep(0.05)  # long enough for concurrent requests to overlap
                        # stop counting before the reply: once the client has the body it may
                        # send its next request before this thread would reach `finally`
                        with server.lock:
                            server.inflight -= counted
                            counted = False
                        self._send(200, GOOD)
                    elif path == "/other.jpg":
                        self._send(200, OTHER)
                    elif path == "/missing.jpg":
                        self._send(404, b"not found", "text/plain")
                    elif path == "/forbidden.jpg":
                        self._send(403, b"no", "text/plain")
                    elif path == "/slow.jpg":
                        time.sleep(1.0)
                        self._send(200, GOOD)
                    elif path == "/short-body.jpg":  # announces more bytes than it sends
                        self._send(200, GOOD[: len(GOOD) // 2], length=len(GOOD))
                        self.close_connection = True
                    elif path == "/cut.jpg":  # a complete response holding half a JPEG
                        self._send(200, GOOD[: len(GOOD) // 2])
                    elif path == "/page.html":
                        self._send(200, b"<html><body>hello</body></html>", "text/html")
                    elif path == "/empty.jpg":
                        self._send(200, b"")
                    elif path == "/flaky.jpg":  # 503 once, then fine
                        if n == 1:
                            self._send(503, b"busy", "text/plain")
                        else:
                            self._send(200, GOOD)
                    elif path == "/broken.jpg":
                        self._send(500, b"oops", "text/plain")
                    else:
                        self._send(404, b"", "text/plain")
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout tests)
                finally:
                    with server.lock:
                        server.inflight -= counted

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return self.base + path

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server():
    s = _Server()
    yield s
    s.close()


def _fetcher(tmp_path, **kw) -> ImageFetcher:
    kw = {"cache_dir": tmp_path / "cache", "timeout": 0.3, "retries": 1, "backoff": 0.01, "max_workers": 4, **kw}
    return ImageFetcher(**kw)


def _same_pixels(img: Image.Image, data: bytes) -> bool:
    return np.array_equal(np.asarray(img), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_good_url_then_cache_hit(server, tmp_path):
    f = _fetcher(tmp_path)
    url = server.url("/good-cache.jpg")
    img, reason = f.load(url)
    assert reason is None and img.mode == "RGB" and _same_pixels(img, GOOD)
    cached = url_cache_path(f.cache_dir, url)
    assert cached.is_file() and cached.read_bytes() == GOOD
    assert not list(cached.parent.glob("*.tmp"))  # atomic write left no temporary file
    img2, reason2 = f.load(url)
    assert reason2 is None and _same_pixels(img2, GOOD)
    assert server.hits["/good-cache.jpg"] == 1  # the second load came from the cache

    # a damaged cache entry is dropped and fetched again
    cached.write_bytes(b"garbage")
    img3, reason3 = f.load(url)
    assert reason3 is None and server.hits["/good-cache.jpg"] == 2 and cached.read_bytes() == GOOD


@pytest.mark.parametrize(
    "path, reason",
    [
        ("/missing.jpg", "http_404"),
        ("/forbidden.jpg", "http_error"),
        ("/broken.jpg", "http_unavailable"),
        ("/slow.jpg", "timeout"),
        ("/short-body.jpg", "truncated"),
        ("/cut.jpg", "truncated"),
        ("/page.html", "not_an_image"),
        ("/empty.jpg", "not_an_image"),
    ],
)
def test_bad_urls_give_none_and_reason(server, tmp_path, path, reason):
    f = _fetcher(tmp_path)
    t0 = time.monotonic()
    img, got = f.load(server.url(path))
    assert img is None and got == reason and got in REASONS
    assert time.monotonic() - t0 < 5
    # failures are never cached
    assert not url_cache_path(f.cache_dir, server.url(path)).exists()


def test_retries_transient_but_not_permanent_failures(server, tmp_path):
    f = _fetcher(tmp_path, retries=2)
    img, reason = f.load(server.url("/flaky.jpg"))
    assert reason is None and _same_pixels(img, GOOD) and server.hits["/flaky.jpg"] == 2
    before = server.hits.get("/missing.jpg", 0)
    f.load(server.url("/missing.jpg"))
    assert server.hits["/missing.jpg"] == before + 1  # a 404 is not retried
    before = server.hits.get("/broken.jpg", 0)
    f.load(server.url("/broken.jpg"))
    assert server.hits["/broken.jpg"] == before + 3  # a 500 is: 1 + 2 retries


def test_only_failures_that_say_nothing_about_the_url_are_retried_by_a_rerun(tmp_path, monkeypatch):
    """A refusal (403, ...) is permanent; a name that does not resolve is not: a node without
    internet access gets the same answer for every real host."""
    import socket

    from moedist.features.images import TEMPORARY_REASONS

    def no_such_host(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
    img, reason = _fetcher(tmp_path, retries=0).load("http://images.example.com/x.jpg")
    assert img is None and reason == "connection_error" and reason in TEMPORARY_REASONS
    assert set(TEMPORARY_REASONS) == {"timeout", "connection_error", "http_unavailable"}
    assert "http_error" not in TEMPORARY_REASONS and "http_404" not in TEMPORARY_REASONS


def test_connection_refused(tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    img, reason = _fetcher(tmp_path, retries=0).load(f"http://127.0.0.1:{port}/x.jpg")
    assert img is None and reason == "connection_error"


def test_fetch_many_keeps_order_and_bounds_concurrency(server, tmp_path):
    f = _fetcher(tmp_path, max_workers=2, cache_dir=None)
    server.max_inflight = 0
    urls = [server.url(f"/good-{i}.jpg") for i in range(8)]
    srcs = [urls[0], None, server.url("/missing.jpg"), *urls[1:], server.url("/other.jpg")]
    out = f.fetch_many(srcs)
    assert [r for _, r in out] == [None, "no_image", "http_404", *[None] * 7, None]
    assert _same_pixels(out[-1][0], OTHER) and _same_pixels(out[0][0], GOOD)
    assert server.max_inflight == 2  # requests overlapped, but never more than max_workers


def test_local_files(tmp_path):
    good = tmp_path / "a.jpg"
    good.write_bytes(GOOD)
    (tmp_path / "sub").mkdir()
    rel = tmp_path / "sub" / "b.png"
    Image.new("RGBA", (5, 7), (10, 20, 30, 128)).save(rel)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(GOOD[: len(GOOD) // 2])
    text = tmp_path / "notes.jpg"
    text.write_text("hello")
    f = ImageFetcher(base_dir=tmp_path)
    img, r = f.load(str(good))
    assert r is None and _same_pixels(img, GOOD)
    img, r = f.load("sub/b.png")  # relative to base_dir; RGBA -> RGB
    assert r is None and img.mode == "RGB" and img.size == (5, 7)
    assert f.load(good.as_uri())[1] is None  # file:// URL
    assert f.load(str(tmp_path / "nope.jpg")) == (None, "file_not_found")
    assert f.load(str(tmp_path)) == (None, "file_not_found")  # a folder
    assert f.load(str(cut)) == (None, "truncated")
    assert f.load(str(text)) == (None, "not_an_image")
    assert f.load(None) == (None, "no_image")
    assert f.load(float("nan")) == (None, "no_image")
    assert f.load("  ") == (None, "no_image")
    assert f.load("ftp://example.org/x.jpg") == (None, "bad_source")
    assert ImageFetcher(max_bytes=10).load(str(good)) == (None, "too_large")
    assert load_image(str(good))[1] is None


def test_decode_image_never_raises():
    assert decode_image(b"")[1] == "not_an_image"
    assert decode_image(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)[0] is None
    assert decode_image(GOOD)[0].size == (32, 24)


def _encoded(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def test_a_tiny_strip_is_refused_before_resizing_it_allocates_gigabytes():
    strip = _encoded(Image.new("RGB", (20000, 1), (200, 10, 10)), "PNG")  # 143 bytes
    t0 = time.perf_counter()
    assert decode_image(strip) == (None, "extreme_aspect")
    assert decode_image(_encoded(Image.new("RGB", (1, 5000)), "PNG")) == (None, "extreme_aspect")
    assert time.perf_counter() - t0 < 5
    assert "extreme_aspect" in REASONS
    # wide but sane banners are kept, pixels unchanged
    img, r = decode_image(_encoded(Image.new("RGB", (900, 10), (1, 2, 3)), "PNG"))
    assert r is None and img.size == (900, 10) and np.asarray(img)[0, 0].tolist() == [1, 2, 3]


def test_more_pixels_than_pil_allows_is_too_large_even_where_pil_only_warns(monkeypatch):
    data = _encoded(Image.new("L", (40, 40), 7), "PNG")  # 1600 px
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1x..2x the limit: PIL warns and decodes
    with pytest.warns(Image.DecompressionBombWarning):
        assert decode_image(data) == (None, "too_large")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # beyond 2x: PIL raises
    assert decode_image(data) == (None, "too_large")


def test_high_bit_depth_greyscale_is_scaled_not_clipped():
    grey16 = Image.fromarray(np.array([[0, 30000], [65535, 257]], dtype=np.uint16))
    img, r = decode_image(_encoded(grey16, "PNG"))
    assert r is None and img.mode == "RGB"
    assert np.asarray(img)[..., 0].tolist() == [[0, 117], [255, 1]]  # round(v / 257); PIL clipped 30000 to 255
    assert (np.asarray(img)[..., 0] == np.asarray(img)[..., 2]).all()
    unit = Image.fromarray(np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32))  # float in [0, 1]: was all black
    img, r = decode_image(_encoded(unit, "TIFF"))
    assert r is None and np.asarray(img)[..., 1].tolist() == [[0, 128], [255, 64]]
    eight = Image.fromarray(np.array([[0.0, 100.0], [255.0, 3.0]], dtype=np.float32))  # float holding 8-bit values
    assert np.asarray(decode_image(_encoded(eight, "TIFF"))[0])[..., 0].tolist() == [[0, 100], [255, 3]]
    wide = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))  # mode "I"
    assert np.asarray(decode_image(_encoded(wide, "TIFF"))[0])[..., 0].tolist() == [[0, 255]]
    # RGBA keeps the reference extractors' behaviour: alpha dropped, colour kept
    img, _ = decode_image(_encoded(Image.new("RGBA", (3, 3), (255, 0, 0, 0)), "PNG"))
    assert np.asarray(img)[0, 0].tolist() == [255, 0, 0]
