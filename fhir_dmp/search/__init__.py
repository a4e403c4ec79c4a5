"""FHIR R4 search: parameters -> index values -> MongoDB filters.

Pure Python, no HTTP, tokens or consent. Storage keeps, per resource,
``s`` (search index) and ``o`` (sort keys) from :func:`extract`; requests
are parsed by :func:`parse_search` into a :class:`SearchRequest` whose
``mongo_filter()``/``mongo_sort()`` run against those fields, paged with
:func:`keyset_filter` and cursors (:func:`cursor_after`).
"""
from .extract import extract, parse_reference, patient_id_of, reference_id, sort_key_name
from .includes import include_targets, revinclude_filter
from .indexes import index_specs
from .paging import (cursor_after, decode_cursor, decode_history_cursor, encode_cursor, encode_history_cursor,
                     keyset_filter, sort_values)
from .query import Criterion, Include, SearchRequest, parse_search
from .registry import PATIENT_COMPARTMENT, SUPPORTED, SearchParam

__all__ = [
    "SUPPORTED", "SearchParam", "PATIENT_COMPARTMENT", "extract", "patient_id_of", "parse_reference",
    "sort_key_name", "reference_id", "parse_search", "SearchRequest", "Criterion", "Include", "index_specs",
    "encode_cursor", "decode_cursor", "keyset_filter", "sort_values", "cursor_after",
    "encode_history_cursor", "decode_history_cursor",
    "include_targets", "revinclude_filter",
]
