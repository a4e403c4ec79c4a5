"""The application object (``fhir_dmp/http/app.py``): Flask's ``ensure_sync`` answered once per
function (issue 22), the same answer as Flask's, nothing kept of a function that is gone."""
from __future__ import annotations

import gc

from fhir_dmp.http.app import _Flask


def test_ensure_sync_is_flasks_and_forgets_functions():
    app = _Flask(__name__)

    def hook(response):
        return response

    class Handler:
        def __call__(self, x):
            return x

        def method(self, x):
            return x

    h = Handler()
    for func in (hook, h, h.method, len):
        assert app.ensure_sync(func) is func and app.ensure_sync(func) is func
    assert hook in app._plain and h in app._plain

    def per_request(response):
        return response
    app.ensure_sync(per_request)
    before = len(app._plain)
    del per_request
    gc.collect()
    assert len(app._plain) == before - 1

    async def coroutine():   # Flask's answer for a coroutine function (asgiref or its error)
        return 1
    try:
        wrapped = app.ensure_sync(coroutine)
    except RuntimeError:
        return
    assert wrapped is not coroutine and wrapped() == 1
