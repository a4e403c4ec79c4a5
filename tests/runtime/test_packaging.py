"""Packaging (issue 9): the CapabilityStatement ships inside the package; bounds that really work."""
import json
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


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
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-v",
                            "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True, text=True,
                           timeout=300)
    # every data folder is declared (setup.cfg): setuptools has nothing to warn about
    assert "absent from the `packages` configuration" not in built.stdout + built.stderr
    wheel = next(tmp_path.glob("fhir_dmp-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "fhir_dmp/data/capability_statement.json" in names
    ig = {p.name for p in (ROOT / "ig").glob("*.json")}
    assert ig and {f"fhir_dmp/data/ig/{n}" for n in ig} <= names
    # every file of the package's data folders is in the wheel (templates, CSS, CSV, JSON)
    package = ROOT / "fhir_dmp"
    data = {f"fhir_dmp/{p.relative_to(package).as_posix()}" for p in package.rglob("*")
            if p.is_file() and p.suffix in (".html", ".css", ".csv", ".json")}
    assert "fhir_dmp/portal/templates/portal/base.html" in data and data <= names


def _readme_commands() -> list[str]:
    import re
    return re.findall(r"```sh\n(.*?)\n```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second():
    serve, test = _readme_commands()[:2]
    assert serve == "pip install -e . && fhir-dmp serve"
    assert test == "pip install -e '.[test]' -c constraints.txt && pytest"
    ci = [line for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
          if line and not line.startswith("#")]
    assert ci[-1] == test


def test_constraints_pin_every_requirement_within_setup_cfg_ranges():
    """constraints.txt is the closure of .[test]: each requirement of setup.cfg is pinned there, at
    a version its range allows (one set of versions)."""
    import configparser
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg", encoding="utf-8")
    lines = cfg["options"]["install_requires"].splitlines() + cfg["options.extras_require"]["test"].splitlines()
    requirements = [Requirement(line) for line in lines if line.strip() and not line.strip().startswith("#")]
    pins = dict(line.split("==", 1) for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines()
                if "==" in line and not line.startswith("#"))
    pins = {canonicalize_name(name): version for name, version in pins.items()}
    assert requirements
    for req in requirements:
        assert canonicalize_name(req.name) in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[canonicalize_name(req.name)], prereleases=True), \
            f"{req.name}=={pins[canonicalize_name(req.name)]} is outside {req.specifier}"
