"""Render / parse times of fhir_dmp.http.formats, JSON and XML.

Run: python bench/formats.py [repeat]. Prints the median of `repeat` runs for
one Patient and for searchset Bundles of 50 and 100 Patients.
"""
from __future__ import annotations

import copy
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runnable from a checkout without installing

from fhir_dmp.http import formats  # noqa: E402

FIXTURE = ROOT / "tests/fixtures/r4/Patient-example.json"


def searchset(patient: dict, n: int) -> dict:
    entries = []
    for i in range(n):
        p = copy.deepcopy(patient)
        p["id"] = f"p{i}"
        entries.append({"fullUrl": f"http://localhost/fhir/Patient/p{i}", "resource": p,
                        "search": {"mode": "match"}})
    return {"resourceType": "Bundle", "type": "searchset", "total": n,
            "link": [{"relation": "self", "url": "http://localhost/fhir/Patient?_count=100"}],
            "entry": entries}


def median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    repeat = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    patient = formats.loads_json(FIXTURE.read_bytes())
    cases = {"1 Patient": patient, "Bundle 50": searchset(patient, 50),
             "Bundle 100": searchset(patient, 100)}
    formats.from_xml(formats.to_xml(cases["Bundle 100"]))  # warm the type-info cache
    print(f"{'case':<12}{'bytes json':>11}{'bytes xml':>11}{'render json':>13}"
          f"{'render xml':>12}{'parse json':>12}{'parse xml':>11}   (ms, median of {repeat})")
    for name, res in cases.items():
        js, xml = formats.render(res, formats.JSON), formats.render(res, formats.XML)
        assert formats.from_xml(xml) == res and formats.parse_body(
            formats.JSON, js, max_bytes=1 << 30) == res
        r_js = median_ms(lambda: formats.render(res, formats.JSON), repeat)
        r_xml = median_ms(lambda: formats.render(res, formats.XML), repeat)
        p_js = median_ms(lambda: formats.parse_body(formats.JSON, js, max_bytes=1 << 30), repeat)
        p_xml = median_ms(lambda: formats.parse_body(formats.XML, xml, max_bytes=1 << 30), repeat)
        print(f"{name:<12}{len(js):>11}{len(xml):>11}{r_js:>13.2f}{r_xml:>12.2f}"
              f"{p_js:>12.2f}{p_xml:>11.2f}")


if __name__ == "__main__":
    main()
