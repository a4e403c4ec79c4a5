"""Time fhir_dmp.profiles.validate() on a DMP Patient and a DMP DocumentReference.

Usage: python bench/validation.py [N]   (default N = 2000 runs each; after
`pip install -e .`, or with PYTHONPATH=. from the checkout)
Prints the mean and median time per call, in microseconds.
"""
from __future__ import annotations

import statistics
import sys
import time

from fhir_dmp.profiles import IDNATPS_SYSTEM, LABEL_SYSTEM, MASQUE_PS, NIR, validate
from fhir_dmp.profiles.ins import ins_key

BODY = "1850575123456"
PATIENT = {
    "resourceType": "Patient", "id": "p1", "active": True,
    "meta": {"versionId": "3", "lastUpdated": "2024-03-01T10:00:00.123+01:00"},
    "identifier": [{"system": NIR, "value": f"{BODY}{ins_key(BODY):02d}"},
                   {"system": "urn:oid:1.2.250.1.71.4.2.7", "value": "123456789"}],
    "extension": [{
        "url": "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-identity-reliability",
        "extension": [{"url": "identityStatus", "valueCoding": {
            "system": "https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-identity-status",
            "code": "VALI"}},
            {"url": "validationDate", "valueDate": "2024-01-15"}]}],
    "text": {"status": "generated",
             "div": '<div xmlns="http://www.w3.org/1999/xhtml"><p>Marie DURAND</p></div>'},
    "name": [{"use": "official", "family": "DURAND", "given": ["Marie", "Anne"]}],
    "telecom": [{"system": "email", "value": "marie@example.org", "use": "home"},
                {"system": "phone", "value": "+33600000000", "use": "mobile"}],
    "gender": "female", "birthDate": "1985-05-12",
    "address": [{"use": "home", "line": ["1 rue de la Paix"], "city": "Paris", "postalCode": "75002"}],
    "generalPractitioner": [{"identifier": {"system": IDNATPS_SYSTEM, "value": "810001234567"}}],
}
DOCREF = {
    "resourceType": "DocumentReference", "id": "d1", "status": "current", "docStatus": "final",
    "masterIdentifier": {"system": "urn:ietf:rfc:3986", "value": "urn:oid:1.2.3.4.5.6"},
    "type": {"coding": [{"system": "http://loinc.org", "code": "11488-4",
                         "display": "Consultation note"}]},
    "category": [{"coding": [{"system": "urn:oid:1.2.250.1.213.1.1.4.1", "code": "10"}]}],
    "subject": {"reference": "Patient/p1"}, "date": "2024-03-01T10:00:00+01:00",
    "author": [{"identifier": {"system": IDNATPS_SYSTEM, "value": "810001234567"}}],
    "securityLabel": [{"coding": [{"system": LABEL_SYSTEM, "code": MASQUE_PS}]}],
    "content": [{"attachment": {"contentType": "application/pdf", "language": "fr-FR",
                                "size": 3654, "hash": "2jmj7l5rSw0yVb/vlWAYkK/YBwk=",
                                "title": "Compte rendu", "creation": "2024-03-01T09:35:00+01:00",
                                "url": "Binary/b1"},
                 "format": {"system": "http://ihe.net/fhir/ihe.formatcode.fhir/CodeSystem/formatcode",
                            "code": "urn:ihe:iti:xds-sd:pdf:2008"}}],
    "context": {"period": {"start": "2024-03-01T09:00:00+01:00"},
                "practiceSetting": {"coding": [{"system": "urn:oid:1.2.250.1.213.1.1.4.9",
                                                "code": "SR03"}]}},
}


def bench(resource: dict, n: int) -> tuple[float, float]:
    validate(resource)                      # warm the model and schema caches
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        validate(resource)
        times.append(time.perf_counter() - t0)
    return statistics.fmean(times) * 1e6, statistics.median(times) * 1e6


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    for resource in (PATIENT, DOCREF):
        mean, median = bench(resource, n)
        print(f"validate({resource['resourceType']}): mean {mean:.0f} us, median {median:.0f} us "
              f"over {n} runs")


if __name__ == "__main__":
    main()
