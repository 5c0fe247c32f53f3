"""Item images from local paths or URLs, failing soft.

An item's image is a local path (absolute, ``file://``, or relative to a base folder) or an
``http(s)`` URL. Whatever goes wrong, :func:`load_image` and :meth:`ImageFetcher.fetch_many`
return ``(None, reason)`` instead of raising: one bad image must not stop an extraction of
100k items. The pipeline counts the reasons and writes them to the manifest.

Reasons (a small fixed vocabulary, so they can be counted):

========================  ==========================================================
``no_image``              the item has no image (null or empty source)
``file_not_found``        a local path that does not exist (or is not a file)
``http_404``              the server said 404 / 410
``http_unavailable``      5xx or 429: the server could not answer now (after retries)
``http_error``            any other non-200 status (403, 401, 400, ...: the server refuses)
``timeout``               no response / no data within ``timeout`` seconds (after retries)
``connection_error``      refused, reset, DNS failure, ... (after retries; a name that does
                          not resolve is also what a node without internet access sees)
``truncated``             fewer bytes than announced, or an image file cut short
``not_an_image``          the bytes are not an image PIL recognises
``too_large``             more than ``max_bytes`` bytes, or more pixels than PIL's
                          ``Image.MAX_IMAGE_PIXELS`` (a decompression bomb: PIL only warns
                          between 1x and 2x that limit; here it is refused, undecoded)
``extreme_aspect``        one side more than ``max_aspect`` (100) times the other: a
                          1-pixel-high strip is tiny on disk, but resizing its short side
                          to the model input (Resize(256)) would allocate gigabytes
``decode_error``          PIL recognised the format but could not decode it
``bad_source``            an unsupported URL scheme (also as a redirect's target) or
                          unreadable local file
========================  ==========================================================

Which reasons a re-run retries is decided by the pipeline (:data:`TEMPORARY_REASONS`,
and ``file_not_found`` when the file has appeared since).

Decoded images are RGB. 16-bit greyscale (``I;16``, ``I``) and float (``F``) images are scaled
to 8 bits first (:func:`to_rgb`); PIL's own ``convert("RGB")`` would clip them to white / black.

URL downloads go through an on-disk cache: ``<cache_dir>/<sha256(url)[:2]>/<sha256(url)>``,
written atomically (temporary file + ``os.replace``) and only for bytes that decoded as an
image, so a transient failure is never cached. Fetches run in a thread pool of
``max_workers`` (bounded concurrency); failures that may be transient (timeouts, connection
errors, 5xx, 429) are retried with exponential backoff.
"""
from __future__ import annotations

import hashlib
import http.client
import io
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image, UnidentifiedImageError
from moedist.io import atomic_write_bytes

REASONS = (
    "no_image",
    "file_not_found",
    "http_404",
    "http_unavailable",
    "http_error",
    "timeout",
    "connection_error",
    "truncated",
    "not_an_image",
    "too_large",
    "extreme_aspect",
    "decode_error",
    "bad_source",
)

# failures that say nothing about the image itself (the network, a server, a mount):
# a re-run of the extraction rebuilds the shards that have any (see pipeline.plan_extraction).
# A refusal (403, 401, 400, ...) is the server's answer about the URL, the same on every run:
# retrying it would re-encode its shard on every re-run.
TEMPORARY_REASONS = ("timeout", "connection_error", "http_unavailable")

USER_AGENT = "moedist-feature-extractor/0.1"
# Longest / shortest side above which an image is refused (``extreme_aspect``). Real product
# photos and banners stay far below; at 100 the resize of the short side to 256 px makes at
# most a 256 x 25,600 RGB intermediate (~20 MB), at 1:20,000 it was 15 GB (measured: 6 GB RSS
# and 14 s for one 20000 x 1 PNG of 143 bytes).
MAX_ASPECT = 100.0


class _Transient(Exception):
    """A failure worth retrying; ``reason`` is reported if the retries run out."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _Permanent(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def is_url(src: str) -> bool:
    return src.startswith(("http://", "https://"))


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http(s) URLs only. urllib's own handler also follows ``ftp://``, so
    a server named in the metadata could make the fetcher connect to any host and port."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            fp.close()
            raise _Permanent("bad_source")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_HttpOnlyRedirects)


def portable_image_ref(src: str) -> str:
    """An item's image source as it identifies the image, not the machine: a URL as it is, a
    local path by its last two parts (``<item_id>/<file>`` under an image folder, or
    ``<folder>/<file>``). Prepared tables store local paths absolute, so the same raw data
    prepared in another folder (a copy on a cluster volume) names the same images."""
    if "://" in src and not src.startswith("file://"):
        return src
    return "/".join(src.removeprefix("file://").rstrip("/").rsplit("/", 2)[-2:])


def url_cache_path(cache_dir: str | Path, url: str) -> Path:
    h = hashlib.sha256(url.encode("utf-8")).hexdigest()
    return Path(cache_dir) / h[:2] / h


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL image -> RGB, scaling high-bit-depth greyscale to 8 bits first.

    ``convert("RGB")`` clips 16-bit / 32-bit integer and float pixels to 0..255, so a
    mid-grey 16-bit scan becomes white and a float image in [0, 1] black. Here:

    * ``I;16*``: value / 257 (65535 -> 255);
    * ``I`` (32-bit int; how some decoders hand over 16-bit data): clipped to 0..65535, / 257;
    * ``F`` (float): by its range -- max <= 1 (the usual convention) x 255; max <= 255 as is;
      max <= 65535 / 257; beyond that min-max scaled. NaN / inf -> 0.

    Everything else (RGBA, LA, P, CMYK, ...) goes through ``convert("RGB")`` unchanged, as
    the reference extractors do (alpha is dropped, not composited).
    """
    if im.mode == "RGB":
        return im
    if im.mode in _SIXTEEN_BIT or im.mode in ("I", "F"):
        import numpy as np

        a = np.asarray(im, dtype=np.float64)
        if im.mode == "F":
            a = np.where(np.isfinite(a), a, 0.0)
            hi = float(a.max()) if a.size else 0.0
            lo = float(a.min()) if a.size else 0.0
            if lo >= 0.0 and hi <= 1.0:
                a = a * 255.0
            elif lo >= 0.0 and hi <= 255.0:
                pass
            elif lo >= 0.0 and hi <= 65535.0:
                a = a / 257.0
            else:
                a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        else:
            a = np.clip(a, 0.0, 65535.0) / 257.0
        grey = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return im.convert("RGB")


def decode_image(data: bytes, *, max_pixels: int | None = None, max_aspect: float = MAX_ASPECT) -> tuple[Image.Image | None, str | None]:
    """Bytes -> fully decoded RGB image, or ``(None, reason)``.

    The size is checked from the header, before any pixel is decoded: more than
    ``max_pixels`` (default PIL's ``Image.MAX_IMAGE_PIXELS``) -> ``too_large``; a side more
    than ``max_aspect`` times the other -> ``extreme_aspect``.
    """
    if not data:
        return None, "not_an_image"
    limit = max_pixels if max_pixels is not None else (Image.MAX_IMAGE_PIXELS or 89_478_485)
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w < 1 or h < 1:
                return None, "decode_error"
            if w * h > limit:
                return None, "too_large"  # PIL itself only warns up to 2x its limit, and decodes it
            if max(w, h) > max_aspect * min(w, h):
                return None, "extreme_aspect"
            im.load()  # decode now: a truncated file fails here, not later in the encoder
            rgb = to_rgb(im)
            return (rgb.copy() if rgb is im else rgb), None  # the `with` closes `im`
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # the warning too, if a filter made it an error
        return None, "too_large"
    except UnidentifiedImageError:
        return None, "not_an_image"
    except (OSError, SyntaxError, ValueError) as e:  # PIL raises OSError("image file is truncated ...")
        return None, "truncated" if "truncat" in str(e).lower() else "decode_error"
    except Exception:  # noqa: BLE001 - a corrupt file must never stop the extraction
        return None, "decode_error"


def local_image_path(src: str, base_dir: str | Path | None = None) -> Path:
    """The file a local image source names (``file://`` URL, absolute, or relative to ``base_dir``)."""
    if src.startswith("file://"):
        src = urllib.request.url2pathname(src[len("file://"):])
    p = Path(src).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = Path(base_dir) / p
    return p


@dataclass
class ImageFetcher:
    """Loads images from paths / URLs with bounded concurrency, retries and a disk cache.

    ``timeout`` is the socket timeout (connect and each read) in seconds; ``retries`` is the
    number of extra attempts after a transient failure, waiting ``backoff * 2**attempt``
    seconds before each.
    """

    cache_dir: str | Path | None = None
    base_dir: str | Path | None = None
    max_workers: int = 8
    timeout: float = 10.0
    retries: int = 2
    backoff: float = 0.5
    max_bytes: int = 64 * 1024 * 1024

    # ------------------------------------------------------------------ public

    def load(self, src: str | os.PathLike | None) -> tuple[Image.Image | None, str | None]:
        """One image: ``(RGB image, None)`` or ``(None, reason)``. Never raises."""
        try:
            if not isinstance(src, (str, os.PathLike)):  # None, NaN / pd.NA from pandas
                return None, "no_image"
            src = os.fspath(src)
            if not src.strip():
                return None, "no_image"
            src = src.strip()
            if is_url(src):
                return self._load_url(src)
            if "://" in src and not src.startswith("file://"):
                return None, "bad_source"
            return self._load_file(src)
        except Exception:  # noqa: BLE001 - last line of defence: never raise
            return None, "decode_error"

    def fetch_many(self, sources: Sequence[str | None]) -> list[tuple[Image.Image | None, str | None]]:
        """Many images, in order; URLs are fetched ``max_workers`` at a time."""
        sources = list(sources)
        if not sources:
            return []
        if self.max_workers <= 1 or not any(isinstance(s, str) and is_url(s.strip()) for s in sources):
            return [self.load(s) for s in sources]
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(sources)), thread_name_prefix="img-fetch") as pool:
            return list(pool.map(self.load, sources))

    # ------------------------------------------------------------------ local files

    def _load_file(self, src: str) -> tuple[Image.Image | None, str | None]:
        p = local_image_path(src, self.base_dir)
        if not p.is_file():
            return None, "file_not_found"
        try:
            size = p.stat().st_size
            if size > self.max_bytes:
                return None, "too_large"
            data = p.read_bytes()
        except OSError:
            return None, "bad_source"
        return decode_image(data)

    # ------------------------------------------------------------------ URLs

    def _load_url(self, url: str) -> tuple[Image.Image | None, str | None]:
        cached = url_cache_path(self.cache_dir, url) if self.cache_dir is not None else None
        if cached is not None and cached.is_file():
            try:
                img, reason = decode_image(cached.read_bytes())
            except OSError:
                img, reason = None, "decode_error"
            if img is not None:
                return img, None
            # a damaged cache entry (should not happen: writes are atomic): drop and refetch
            try:
                cached.unlink()
            except OSError:
                pass
        reason = "connection_error"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * (2 ** (attempt - 1)))
            try:
                data = self._download(url)
            except _Transient as e:
                reason = e.reason
                continue
            except _Permanent as e:
                return None, e.reason
            img, reason = decode_image(data)
            if img is None:
                # a body cut short by the network decodes as "truncated": worth another try
                if reason == "truncated":
                    continue
                return None, reason
            if cached is not None:
                try:
                    atomic_write_bytes(cached, data)
                except OSError:
                    pass  # a read-only cache is not an error
            return img, None
        return None, reason

    def _download(self, url: str) -> bytes:
        req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        try:
            with _OPENER.open(req, timeout=self.timeout) as resp:  # http(s) only: checked above, and on redirects
                length = resp.headers.get("Content-Length")
                if length is not None and length.isdigit() and int(length) > self.max_bytes:
                    raise _Permanent("too_large")
                chunks, n = [], 0
                while True:
                    chunk = resp.read(1 << 16)
                    if not chunk:
                        break
                    n += len(chunk)
                    if n > self.max_bytes:
                        raise _Permanent("too_large")
                    chunks.append(chunk)
                data = b"".join(chunks)
                if length is not None and length.isdigit() and len(data) < int(length):
                    raise _Transient("truncated")
                return data
        except urllib.error.HTTPError as e:
            if e.code in (404, 410):
                raise _Permanent("http_404") from None
            if e.code == 429 or e.code >= 500:
                raise _Transient("http_unavailable") from None
            raise _Permanent("http_error") from None
        except http.client.IncompleteRead:
            raise _Transient("truncated") from None
        except (socket.timeout, TimeoutError):
            raise _Transient("timeout") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (socket.timeout, TimeoutError)):
                raise _Transient("timeout") from None
            raise _Transient("connection_error") from None
        except (ConnectionError, http.client.HTTPException, OSError):
            raise _Transient("connection_error") from None


def load_image(src: str | os.PathLike | None, **fetcher_kwargs) -> tuple[Image.Image | None, str | None]:
    """Convenience wrapper: ``ImageFetcher(**fetcher_kwargs).load(src)``."""
    return ImageFetcher(**fetcher_kwargs).load(src)
