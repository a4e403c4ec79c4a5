"""The storage filter language, evaluated in memory on one stored document.

Two callers, one definition: the access decision judges a single resource with the same query
its search guard sends to the database (``security/decision/``), and the per-process DMP
document cache (``search/doc_cache.py``) answers a search from memory. Only a subset of the MongoDB
filter language is evaluated, each operator with MongoDB's meaning for the values the server
stores (scalars and arrays of scalars or of flat sub-documents, reached by dotted paths):
equality, ``$in``, ``$nin``, ``$ne``, ``$exists``, ``$not``, ``$elemMatch`` (on arrays of
scalars, or a query on arrays of flat sub-documents), ``$gt``/``$gte``/``$lt``/``$lte`` (between values of one type: strings, dates,
numbers), ``$regex`` (a pattern without options: the ones ``search/query.py`` builds from
``re.escape``, which Python's ``re`` reads as MongoDB's PCRE does), ``$or``, ``$and``, ``$nor`` (a search's ``:not`` and ``:missing``). Anything else raises :class:`Unsupported`: the caller then asks
the database (https://www.mongodb.com/docs/manual/reference/operator/query/).
"""
from __future__ import annotations

import operator
import re
from datetime import datetime


class Unsupported(ValueError):
    """The filter uses something this module does not evaluate exactly as MongoDB does."""


_COMPARE = {"$gt": operator.gt, "$gte": operator.ge, "$lt": operator.lt, "$lte": operator.le}


def values_at(doc, parts: tuple) -> list:
    """Values at a dotted path (split in ``parts``), arrays flattened as MongoDB does
    (``a.types.0`` indexes)."""
    cur = [doc]
    for part in parts:
        nxt = []
        for v in cur:
            if isinstance(v, dict):
                if part in v:
                    nxt.append(v[part])
            elif isinstance(v, list):
                if part.isdigit():
                    if int(part) < len(v):
                        nxt.append(v[int(part)])
                else:
                    nxt += [x[part] for x in v if isinstance(x, dict) and part in x]
        cur = nxt
    return cur


def _kind(v):
    """The comparison class of a scalar (MongoDB compares only within one BSON type class)."""
    if isinstance(v, bool):
        return bool
    if isinstance(v, (int, float)):
        return float
    if isinstance(v, (str, datetime)):
        return type(v)
    return None


def _comparison(op: str, arg):
    kind = _kind(arg)
    if kind not in (str, datetime, float):
        raise Unsupported(f"{op} on {type(arg).__name__}")
    if kind is datetime and arg.tzinfo is None:
        raise Unsupported(f"{op} on a naive date")
    test = _COMPARE[op]
    return lambda values, flat: any(test(v, arg) for v in flat if _kind(v) is kind)


def _membership(arg):
    """``v -> v in arg`` through a set when ``arg``'s values hash (the decision's lists of ~100
    allowed type codes, tested for every document of a search page); the list itself
    for a value that does not hash. Equality is the same either way (``in`` compares with ==)."""
    try:
        members = frozenset(arg)
    except TypeError:
        return lambda v: v in arg

    def member(v) -> bool:
        try:
            return v in members
        except TypeError:
            return v in arg
    return member


def _operator(op: str, arg):
    """``(values, flat) -> bool`` for one operator of a field condition (``flat``: the values
    with arrays opened, as MongoDB compares them)."""
    if op == "$exists":
        return lambda values, flat: bool(values) == bool(arg)
    if op == "$in":
        member = _membership(arg)
        return lambda values, flat: any(member(v) for v in flat) or (not values and None in arg)
    if op == "$nin":
        member = _membership(arg)
        return lambda values, flat: not any(member(v) for v in flat)
    if op == "$ne":
        return lambda values, flat: not any(v == arg for v in flat)
    if op == "$not":
        inner = _condition(arg)
        return lambda values, flat: not inner(values)
    if op == "$elemMatch" and _fields(arg):    # a query on each sub-document of an array
        sub = compile_query(arg)
        return lambda values, flat: any(sub(x) for v in values if isinstance(v, list) for x in v
                                        if isinstance(x, dict))
    if op == "$elemMatch":
        inner = _condition(arg)
        return lambda values, flat: any(inner([x]) for v in values if isinstance(v, list) for x in v)
    if op in _COMPARE:
        return _comparison(op, arg)
    if op == "$regex" and isinstance(arg, str):     # the patterns search/query.py writes (re.escape)
        rx = re.compile(arg, re.ASCII)      # \s, \w as PCRE's without UCP: ASCII only
        return lambda values, flat: any(isinstance(v, str) and rx.search(v) for v in flat)
    raise Unsupported(f"operator {op} is not evaluated in memory")


def _fields(arg) -> bool:
    """``arg`` of an ``$elemMatch`` is a query on sub-documents (field names), not operators."""
    return isinstance(arg, dict) and bool(arg) and not any(k.startswith("$") for k in arg)


def _condition(cond):
    """``values -> bool``: the condition on one field (equality, or a document of operators)."""
    if not isinstance(cond, dict) or not any(k.startswith("$") for k in cond):
        # equal to the whole value (an array included) or to one element of an array
        return lambda values: any(v == cond or isinstance(v, list) and any(x == cond for x in v)
                                  for v in values)
    tests = [_operator(op, arg) for op, arg in cond.items()]

    def test(values):
        flat = [x for v in values for x in (v if isinstance(v, list) else (v,))]
        return all(t(values, flat) for t in tests)
    return test


def compile_query(query: dict):
    """``doc -> bool``: :func:`matches` with ``query`` read once, for many documents. Raises
    :class:`Unsupported` for what this module does not evaluate (see the module docstring)."""
    tests = []
    for key, cond in query.items():
        if key in _LOGICAL:
            subs = [compile_query(q) for q in cond]
            tests.append(lambda doc, subs=subs, join=_LOGICAL[key]: join(s(doc) for s in subs))
        elif key.startswith("$"):
            raise Unsupported(f"operator {key} is not evaluated in memory")
        else:
            parts, test = tuple(key.split(".")), _condition(cond)
            tests.append(lambda doc, parts=parts, test=test: test(values_at(doc, parts)))
    return lambda doc: all(t(doc) for t in tests)


def _none(results) -> bool:
    return not any(results)


#: the logical operators over a list of filters (``$nor``: none of them holds)
_LOGICAL = {"$or": any, "$and": all, "$nor": _none}

class Memo:
    """Results of a pure function by key, at most ``size`` of them (all dropped when full: the
    callers ask the same few again and again). Shared by threads: a lost race computes twice."""

    __slots__ = ("size", "_data")

    def __init__(self, size: int):
        self.size = size
        self._data: dict = {}

    def get(self, key, compute):
        """The value of ``key``, ``compute()`` stored first when it is not known (an exception
        stores nothing)."""
        try:
            return self._data[key]
        except KeyError:
            pass
        value = compute()
        self.put(key, value)
        return value

    def peek(self, key):
        """The value of ``key``, or None when it is not known."""
        return self._data.get(key)

    def put(self, key, value) -> None:
        if len(self._data) >= self.size:
            self._data.clear()
        self._data[key] = value

    def __len__(self) -> int:
        return len(self._data)


_COMPILED = Memo(1024)     # repr(query) -> compile_query(query): the decision asks the same few


def query_key(query: dict) -> str:
    """A key equal for two queries exactly when they are the same query (values are plain:
    strings, numbers, booleans, dates, lists and documents of them, whose repr is their value)."""
    return repr(query)


def compiled(query: dict, key: str | None = None):
    """:func:`compile_query`, once per process per distinct query (``key``: its :func:`query_key`,
    when the caller has it already)."""
    return _COMPILED.get(query_key(query) if key is None else key, lambda: compile_query(query))


def matches(query: dict, doc: dict) -> bool:
    """Does ``doc`` (a stored document: ``pid``, ``a`` facets...) match ``query``? Raises
    :class:`Unsupported` for what this module does not evaluate (see the module docstring)."""
    return compiled(query)(doc)


def _plain(value) -> bool:
    """A value whose equality means the same in Python and in MongoDB (no null, no document)."""
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return isinstance(value, (str, bool, int, float, datetime))


def exact(query: dict) -> bool:
    """Is every condition of ``query`` one :func:`matches` decides exactly as MongoDB would?

    Stricter than :func:`matches` (which the decision uses on its own queries): equality and
    ``$in``/``$nin``/``$ne`` only with plain values (a document or a null means something else
    to MongoDB: a whole-document match, a missing field), ``$elemMatch`` with operators (on
    arrays of scalars) or with an exact query on the sub-documents, ``$regex`` without options; no ``$expr``...
    """
    for key, cond in query.items():
        if key in _LOGICAL:
            if not isinstance(cond, list) or not all(isinstance(q, dict) and exact(q) for q in cond):
                return False
        elif key.startswith("$") or not _exact_condition(cond):
            return False
    return True


def _exact_condition(cond) -> bool:
    if not isinstance(cond, dict):
        return _plain(cond) and not isinstance(cond, list)
    if not cond or not all(k.startswith("$") for k in cond):
        return False
    for op, arg in cond.items():
        if op == "$exists":
            ok = isinstance(arg, bool)
        elif op in ("$in", "$nin"):
            ok = isinstance(arg, list) and all(_plain(v) and not isinstance(v, list) for v in arg)
        elif op == "$ne":
            ok = _plain(arg) and not isinstance(arg, list)
        elif op in _COMPARE:
            ok = _kind(arg) in (str, datetime, float) and not (isinstance(arg, datetime) and arg.tzinfo is None)
        elif op == "$not":
            ok = isinstance(arg, dict) and _exact_condition(arg)
        elif op == "$regex":
            ok = isinstance(arg, str)
        elif op == "$elemMatch":
            ok = isinstance(arg, dict) and (exact(arg) if _fields(arg) else _exact_condition(arg))
        else:
            ok = False
        if not ok:
            return False
    return True
