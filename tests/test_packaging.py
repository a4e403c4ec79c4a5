"""Packaging (issue 9): the CapabilityStatement ships inside the package; bounds that really work."""
import json
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_packaged_capability_statement_is_the_root_one():
    packaged = resources.files("fhir_dmp").joinpath("data/capability_statement.json").read_text(encoding="utf-8")
    assert json.loads(packaged) == json.loads((ROOT / "capability_statement.json").read_text(encoding="utf-8"))


def test_metadata_is_served_from_package_data():
    from fhir_dmp.resources import capability
    assert capability.STATEMENT_PATH.parent.name == "data"
    assert capability.STATEMENT_PATH.parent.parent == Path(capability.__file__).resolve().parents[1]


def test_dependency_lower_bounds_provide_what_the_code_calls():
    import pypdf
    from pymongo.errors import ClientBulkWriteException  # noqa: F401  (pymongo >= 4.9)
    with pypdf.apply_configuration(array_maximum_element_count=10, dictionary_maximum_element_count=10):
        pass
