"""``GET /``: a small HTML page that links to the patient portal and the FHIR metadata
(CONTRACT.md "The patient portal")."""
from __future__ import annotations

from flask import Flask, Response

PAGE = """<!doctype html>
<html lang="fr"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>fhir_dmp – dossier médical partagé</title></head>
<body><main><h1>Dossier médical partagé (fhir_dmp)</h1>
<ul><li><a href="/portal/">Espace patient</a></li>
<li><a href="/fhir/metadata">API FHIR R4 : CapabilityStatement</a></li></ul></main></body></html>
"""


def register(app: Flask) -> None:
    if "home" in app.view_functions:       # another module already serves GET /
        return

    @app.get("/", endpoint="home")
    def home():
        return Response(PAGE, content_type="text/html; charset=utf-8")
