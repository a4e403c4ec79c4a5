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


def test_wheel_carries_the_capability_statement_and_ig(tmp_path):
    """A built wheel (not only an editable install) serves /metadata and every ig/ canonical."""
    import subprocess
    import sys
    import zipfile
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("fhir_dmp-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "fhir_dmp/data/capability_statement.json" in names
    ig = {p.name for p in (ROOT / "ig").glob("*.json")}
    assert ig and {f"fhir_dmp/data/ig/{n}" for n in ig} <= names
    assert "fhir_dmp/portal/templates/portal/base.html" in names or any(
        n.startswith("fhir_dmp/portal/templates/") for n in names)
