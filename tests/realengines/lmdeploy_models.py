"""Validate JSON bodies with LMDeploy's own DistServe models; run by .venv-lmdeploy's Python.

LMDeploy's package imports torch and its serving stack from ``lmdeploy/__init__.py``, but the two
modules holding the DistServe models (``lmdeploy/pytorch/disagg/config.py`` and
``lmdeploy/pytorch/disagg/conn/protocol.py``) need only pydantic. Their parent packages are therefore
stood in for by empty modules pointing at the real directories, and nothing else of LMDeploy runs.

Input (stdin): a JSON list of ``{"model": <LMDeploy class name>, "body": <object>}`` or
``{"model": ..., "json": <text>}`` (``model_validate_json``). Output (stdout): a JSON list, one entry
each, ``{"ok": true, "dump": <model_dump(mode="json")>}`` or ``{"ok": false, "error": <first error>}``.
``--version`` prints the installed LMDeploy version.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path
from typing import Any


def _load() -> tuple[Any, Any, str]:
    spec = importlib.util.find_spec("lmdeploy")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("lmdeploy is not installed here")
    root = Path(next(iter(spec.submodule_search_locations)))
    for name, sub in (
        ("lmdeploy", ""),
        ("lmdeploy.pytorch", "pytorch"),
        ("lmdeploy.pytorch.disagg", "pytorch/disagg"),
        ("lmdeploy.pytorch.disagg.conn", "pytorch/disagg/conn"),
    ):
        package = types.ModuleType(name)
        package.__path__ = [str(root / sub)]
        sys.modules[name] = package
    config = importlib.import_module("lmdeploy.pytorch.disagg.config")
    protocol = importlib.import_module("lmdeploy.pytorch.disagg.conn.protocol")
    version: dict[str, Any] = {}
    exec((root / "version.py").read_text(), version)  # LMDeploy's own version file
    return config, protocol, version["__version__"]


def main() -> None:
    config, protocol, version = _load()
    if "--version" in sys.argv:
        print(version)
        return
    results = []
    for item in json.load(sys.stdin):
        model = getattr(protocol, item["model"], None) or getattr(config, item["model"])
        try:
            parsed = model.model_validate_json(item["json"]) if "json" in item else model.model_validate(item["body"])
        except ValueError as exc:  # pydantic's ValidationError: report its first error
            errors = exc.errors() if hasattr(exc, "errors") else [{"loc": (), "msg": str(exc)}]
            first = errors[0]
            results.append({"ok": False, "error": f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"})
            continue
        results.append({"ok": True, "dump": parsed.model_dump(mode="json")})
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
