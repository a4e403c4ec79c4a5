"""Structured logs (issue 9): JSON lines with the request id; no traceback for a refused token."""
import io
import json
import logging

from fhir_dmp.runtime.logs import json_handler


def test_log_lines_are_json_with_the_request_id(app, api, idp):
    stream = io.StringIO()
    handler = json_handler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        r = api.as_token("not-a-token").get("Patient", headers={"X-Request-Id": "req-123"})
        assert r.status_code == 401
        with app.test_request_context("/fhir/Patient"):
            from flask import g
            g.request_id = "req-456"
            logging.getLogger("fhir_dmp.test").warning("bound")
        logging.getLogger("fhir_dmp.test").warning("outside")
    finally:
        root.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    bound = [x for x in lines if x["message"] == "bound"][0]
    assert bound["request_id"] == "req-456" and bound["level"] == "WARNING" and bound["logger"] == "fhir_dmp.test"
    assert [x for x in lines if x["message"] == "outside"][0]["request_id"] is None
    assert not any("Traceback" in json.dumps(x) or x.get("exc_info") for x in lines)
    assert "not-a-token" not in stream.getvalue()
