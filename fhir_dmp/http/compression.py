"""HTTP content coding: gzip request bodies in, gzip responses out (RFC 9110 §8.4, §12.5.3).

* Request: ``Content-Encoding: gzip`` (or ``x-gzip``) bodies are decompressed as
  a stream while the handler reads them, never whole in memory; the
  decompressed size is bounded by the app's ``MAX_CONTENT_LENGTH`` like any
  body, counted as it inflates (so a gzip bomb answers 413 without filling memory). Any other coding but ``identity``
  answers 415 (https://hl7.org/fhir/R4/http.html: the server decides what it takes).
* Response: a body of at least ``MIN_SIZE`` bytes is gzipped when the client
  accepts gzip. Streamed responses (raw Binary content) are left as they are:
  they are read chunk by chunk from the encrypted store and are mostly
  compressed formats already (PDF).

Uses the standard library's ``gzip``/``zlib`` only.
"""
from __future__ import annotations

import gzip
import zlib

from flask import Request, Response

from .errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

MIN_SIZE = 1024          # smaller bodies gain nothing from gzip
LEVEL = 5                # speed over the last few percent
GZIP_CODINGS = ("gzip", "x-gzip")


class _GunzipStream:
    """A read-only file over a gzip stream, bounded to ``limit`` decompressed bytes (413 past it);
    corrupt data is a 400, not a 500."""

    def __init__(self, raw, limit: int | None):
        self._gz = gzip.GzipFile(fileobj=raw, mode="rb")
        self._limit = limit
        self._read = 0

    def _count(self, data: bytes) -> bytes:
        self._read += len(data)
        # at the limit, one more byte decides: the reader above stops there (werkzeug LimitedStream)
        if self._limit is not None and self._read >= self._limit and \
                (self._read > self._limit or self._gz.read(1)):
            raise PayloadTooLarge(f"the decompressed request body is larger than {self._limit} bytes")
        return data

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:       # never inflate an unbounded body in one go
            size = (self._limit + 1 - self._read) if self._limit is not None else -1
        try:
            return self._count(self._gz.read(size))
        except (OSError, EOFError, zlib.error):
            raise BadRequest("the request body is not valid gzip data") from None

    def readline(self, size: int = -1) -> bytes:
        try:
            return self._count(self._gz.readline(size))
        except (OSError, EOFError, zlib.error):
            raise BadRequest("the request body is not valid gzip data") from None

    def close(self) -> None:
        self._gz.close()


def decode_request_body(request: Request) -> None:
    """Before the body is read: undo a gzip ``Content-Encoding``; 415 for any other coding."""
    coding = (request.headers.get("Content-Encoding") or "").strip().lower()
    if coding in ("", "identity"):
        return
    if coding not in GZIP_CODINGS:
        raise UnsupportedMediaType(f"Content-Encoding {coding[:40]!r} is not supported; send gzip or "
                                   "identity", headers={"Accept-Encoding": "gzip, identity"})
    environ = request.environ
    environ["wsgi.input"] = _GunzipStream(environ["wsgi.input"], request.max_content_length)
    # the decompressed length is unknown: read to the end, bounded by MAX_CONTENT_LENGTH
    environ.pop("CONTENT_LENGTH", None)
    environ.pop("HTTP_CONTENT_ENCODING", None)
    environ["wsgi.input_terminated"] = True
    for cached in ("stream", "content_length"):     # werkzeug caches them per request
        request.__dict__.pop(cached, None)


def compress_response(request: Request, response: Response) -> Response:
    """Gzip a buffered body when the client accepts it and it is worth it."""
    response.vary.add("Accept-Encoding")
    if (response.direct_passthrough or response.is_streamed or response.status_code in (204, 304)
            or response.headers.get("Content-Encoding") or request.method == "HEAD"):
        return response
    if request.accept_encodings["gzip"] <= 0 and request.accept_encodings["x-gzip"] <= 0:
        return response
    body = response.get_data()
    if len(body) < MIN_SIZE:
        return response
    response.set_data(gzip.compress(body, compresslevel=LEVEL))
    response.headers["Content-Encoding"] = "gzip"
    return response
