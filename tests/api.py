"""A small HTTP client for tests: real requests through the WSGI app, real tokens.

``api.as_patient(pid).get("Patient/1")`` -> werkzeug response with ``.json``.
"""
from __future__ import annotations

import json

from tests import builders


class Api:
    def __init__(self, app, idp):
        self.app = app
        self.idp = idp
        self.http = app.test_client()

    # principals --------------------------------------------------------------
    def as_token(self, token: str | None) -> "Caller":
        return Caller(self, token)

    def as_patient(self, pid, **kw):
        return self.as_token(self.idp.patient(pid, **kw))

    def as_legal_rep(self, related_person_id, **kw):
        return self.as_token(self.idp.legal_rep(related_person_id, **kw))

    def as_ps(self, id_nat_ps=builders.PS_DR, profession="10", purpose=None, **kw):
        return self.as_token(self.idp.ps(id_nat_ps, profession=profession, purpose=purpose, **kw))

    def as_admin(self, **kw):
        return self.as_token(self.idp.admin(**kw))

    def as_officer(self, **kw):
        return self.as_token(self.idp.officer(**kw))

    def as_regulation(self, id_nat_ps=builders.PS_SAMU, **kw):
        return self.as_token(self.idp.regulation_centre(id_nat_ps, **kw))

    def anonymous(self):
        return self.as_token(None)


class Caller:
    def __init__(self, api: Api, token: str | None):
        self.api = api
        self.token = token

    def _headers(self, headers):
        out = {"Accept": "application/fhir+json"}
        if self.token:
            out["Authorization"] = f"Bearer {self.token}"
        out.update(headers or {})
        return out

    def request(self, method, path, *, body=None, headers=None, raw=None, content_type=None, **kw):
        headers = self._headers(headers)
        data = raw
        if body is not None:
            data = json.dumps(body)
            headers.setdefault("Content-Type", content_type or "application/fhir+json")
        elif content_type:
            headers["Content-Type"] = content_type
        return self.api.http.open("/fhir/" + path.lstrip("/"), method=method, data=data, headers=headers, **kw)

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body=None, **kw):
        return self.request("POST", path, body=body, **kw)

    def put(self, path, body=None, **kw):
        return self.request("PUT", path, body=body, **kw)

    def patch(self, path, ops, **kw):
        return self.request("PATCH", path, raw=json.dumps(ops), content_type="application/json-patch+json", **kw)

    def delete(self, path, **kw):
        return self.request("DELETE", path, **kw)

    def create(self, body, **kw):
        """POST and return the created resource (asserting 201)."""
        r = self.post(body["resourceType"], body, **kw)
        assert r.status_code == 201, (r.status_code, r.get_data(as_text=True))
        return r.json

    def search(self, query, **kw):
        r = self.get(query, **kw)
        assert r.status_code == 200, (r.status_code, r.get_data(as_text=True))
        return r.json
