"""Safe inspection of PDF documents before they enter a DMP (DESIGN.md "Documents").

Why pypdf: it is pure Python (no native parser to exploit or to build),
actively maintained, ships its own resource limits against decompression
and structure bombs (``pypdf.Configuration``), and can read the object
graph without rendering anything or decoding content streams.

Policy (a medical record needs a static document — PDF/A forbids all of these):

* must start with ``%PDF-`` and end with ``%%EOF`` (within the last KiB, as
  readers tolerate), be at most ``max_bytes``, and not be encrypted;
* refused: JavaScript (``/JS`` in actions, ``/JavaScript`` name tree or
  action type, ``javascript:`` URIs), ``/Launch`` and ``/GoToE`` actions,
  embedded files (``/EmbeddedFiles`` name tree, ``/EF`` in file
  specifications, ``/EmbeddedFile`` streams), ``/RichMedia``, ``/XFA`` forms.
  ``/OpenAction`` and ``/AA`` (additional actions) are refused when the action
  they hold is one of the above, since every action dictionary is inspected.

How: a quick literal scan of the raw bytes, then pypdf (``strict=False``)
parses every indirect object listed in the cross-reference data (object
streams included) and every object reachable from them; direct sub-objects
are walked with an explicit stack. Streams are never decoded (only object
streams, under pypdf's decompression limits, tightened here). A deadline and
an object budget stop hostile structures; any pypdf failure becomes
:class:`fhir_dmp.http.errors.Unprocessable`. Diagnostics never echo content.
"""
from __future__ import annotations

import io
import time
from dataclasses import dataclass

import pypdf
from pypdf.generic import (ArrayObject, ByteStringObject, DictionaryObject, IndirectObject, NameObject,
                           TextStringObject)

from fhir_dmp.http.errors import PayloadTooLarge, Unprocessable

ATTACHMENT = "DocumentReference.content[0].attachment"

# literal tokens that make a PDF refused outright (long enough never to occur by chance in binary data)
_RAW_FORBIDDEN = (b"/JavaScript", b"/Launch", b"/EmbeddedFile", b"/RichMedia", b"/XFA")
# name values (e.g. of /S, /Type, /Subtype) that mark a forbidden feature
_FORBIDDEN_VALUES = {"/JavaScript": "JavaScript", "/Launch": "Launch action", "/GoToE": "embedded go-to action",
                     "/EmbeddedFile": "embedded file", "/RichMedia": "rich media"}
# dictionary keys that always mark a forbidden feature
_FORBIDDEN_KEYS = {"/JavaScript": "JavaScript", "/EmbeddedFiles": "embedded files", "/XFA": "XFA form",
                   "/RichMediaContent": "rich media", "/RichMediaSettings": "rich media"}

DEFAULT_TIME_LIMIT = 5.0
DEFAULT_MAX_OBJECTS = 500_000


@dataclass(frozen=True)
class PdfInfo:
    pages: int
    version: str = ""


class _Refused(Exception):
    pass


def inspect_pdf(data: bytes, *, max_bytes: int, expression: str = ATTACHMENT,
                time_limit: float = DEFAULT_TIME_LIMIT, max_objects: int = DEFAULT_MAX_OBJECTS) -> PdfInfo:
    """Check a PDF against the policy above and count its pages.

    Raises :class:`PayloadTooLarge` (413) over ``max_bytes``, and
    :class:`Unprocessable` (422, ``expression``) for anything else refused.
    """
    def fail(msg: str):
        return Unprocessable(msg, expression=expression)

    data = bytes(data) if not isinstance(data, bytes) else data
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"PDF exceeds the limit of {max_bytes} bytes", expression=expression)
    if not data.startswith(b"%PDF-"):
        raise fail("content is not a PDF (it must start with %PDF-)")
    if data.rfind(b"%%EOF", max(0, len(data) - 1024)) < 0:
        raise fail("PDF is truncated (no %%EOF marker at the end)")
    for token in _RAW_FORBIDDEN:
        if token in data:
            raise fail(f"PDF contains a forbidden feature ({_describe(token.decode())})")
    version = data[5:8].decode("ascii", "replace") if data[5:8].replace(b".", b"").isdigit() else ""

    try:
        pages = _inspect_with_pypdf(data, time_limit, max_objects)
    except _Refused as exc:
        raise fail(str(exc)) from None
    except RecursionError:
        raise fail("PDF structure is nested too deeply") from None
    except MemoryError:
        raise fail("PDF structure is too large to inspect") from None
    except Exception:  # every pypdf error (PdfReadError, LimitReachedError, ValueError, ...) on hostile input
        raise fail("PDF is malformed and cannot be parsed") from None
    return PdfInfo(pages=pages, version=version)


def _describe(token: str) -> str:
    return _FORBIDDEN_KEYS.get(token) or _FORBIDDEN_VALUES.get(token) or token.lstrip("/")


def _inspect_with_pypdf(data: bytes, time_limit: float, max_objects: int) -> int:
    deadline = time.monotonic() + time_limit
    limits = dict(zlib_maximum_output_length=32_000_000, lzw_maximum_output_length=32_000_000,
                  run_length_maximum_output_length=32_000_000, array_maximum_element_count=100_000,
                  dictionary_maximum_element_count=100_000, page_tree_maximum_depth=64)
    with pypdf.apply_configuration(**limits):
        reader = pypdf.PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted:
            raise _Refused("encrypted PDFs are not accepted")

        queue: list[tuple[int, int]] = []
        for gen, table in list(reader.xref.items()):
            queue.extend((num, gen) for num in list(table))
        queue.extend((num, 0) for num in list(reader.xref_objStm))
        seen: set[tuple[int, int]] = set()

        def check_dict(d) -> None:
            for key, value in d.items():
                if key in _FORBIDDEN_KEYS:
                    raise _Refused(f"PDF contains a forbidden feature ({_FORBIDDEN_KEYS[key]})")
                if key == "/JS" and ("/S" in d or d.get("/Type") == "/Action"):
                    raise _Refused("PDF contains a forbidden feature (JavaScript)")
                if key == "/EF" and isinstance(value, DictionaryObject):
                    raise _Refused("PDF contains a forbidden feature (embedded file)")
                if key == "/URI" and isinstance(value, (TextStringObject, ByteStringObject)):
                    raw = value if isinstance(value, str) else bytes(value).decode("latin-1")
                    if raw.strip().lower().startswith("javascript:"):
                        raise _Refused("PDF contains a forbidden feature (JavaScript)")

        def walk(obj) -> None:
            stack = [obj]
            while stack:
                o = stack.pop()
                if isinstance(o, IndirectObject):
                    ref = (o.idnum, o.generation)
                    if ref not in seen:
                        queue.append(ref)
                elif isinstance(o, NameObject):
                    if o in _FORBIDDEN_VALUES:
                        raise _Refused(f"PDF contains a forbidden feature ({_FORBIDDEN_VALUES[o]})")
                elif isinstance(o, DictionaryObject):  # StreamObject too: only its dictionary, never its data
                    check_dict(o)
                    stack.extend(o.values())
                elif isinstance(o, ArrayObject):
                    stack.extend(o)

        walk(reader.trailer)
        while queue:
            ref = queue.pop()
            if ref in seen:
                continue
            seen.add(ref)
            if len(seen) > max_objects:
                raise _Refused("PDF has too many objects to inspect")
            if time.monotonic() > deadline:
                raise _Refused("PDF structure is too complex to inspect in time")
            walk(reader.get_object(IndirectObject(ref[0], ref[1], reader)))

        if time.monotonic() > deadline:
            raise _Refused("PDF structure is too complex to inspect in time")
        return len(reader.pages)
