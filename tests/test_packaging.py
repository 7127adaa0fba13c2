"""The wheel carries every file the product packages need, not only their Python modules.

setuptools puts only ``.py`` files in a wheel unless ``[tool.setuptools.package-data]`` in
pyproject.toml names the others (templates, static files); a file it misses works from a checkout
and is missing from an installed RouterPanel.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_file_of_the_product_packages_is_python_or_package_data() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = [pattern.rstrip("*") for pattern in config["packages"]["find"]["include"]]
    package_data: dict[str, list[str]] = config.get("package-data", {})
    missing = []
    for package in packages:
        root = ROOT / package
        shipped = {path for pattern in package_data.get(package, []) for path in root.glob(pattern)}
        for path in root.rglob("*"):
            if path.is_file() and path.suffix not in {".py", ".pyc"} and path not in shipped:
                missing.append(str(path.relative_to(ROOT)))
    assert not missing, "not in the wheel (add them to [tool.setuptools.package-data]):\n" + "\n".join(missing)
