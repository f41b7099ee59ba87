"""Imports flow one way: export/ builds on train/ and on serve/; serve/ and clients/ import nothing
from train/ (nor torch), clients/ nothing from export/ or serve/ either: only the generated wire
format in protos/, which imports none of them."""
from __future__ import annotations

import ast
import json
import subprocess

import pytest

from support.serving import PY, ROOT

FORBIDDEN = {
    "serve": ("train", "export", "clients", "torch"),
    "clients": ("train", "export", "serve", "torch"),
    "protos": ("train", "export", "serve", "clients", "torch"),
}


def imported_names(path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement in a file, at any depth (lazy
    imports inside functions included)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the file's package
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names.append((node.lineno, base))
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_statement_crosses_the_layers(package):
    """Every import statement in the package's source, read without running it."""
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, name in imported_names(path):
            if name.split(".")[0] in FORBIDDEN[package]:
                offenders.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not offenders, f"{package}/ must not import {', '.join(FORBIDDEN[package])}:\n" + "\n".join(offenders)


# Imports every module of a package with the forbidden top-level packages made unimportable (a
# meta-path finder that refuses them); prints, as JSON, each module that failed and the repository
# line whose import was refused, and which of torch / sounddevice ended up imported.
_IMPORT_ALL = r'''
import importlib, importlib.abc, json, pkgutil, sys, traceback

package, blocked, root = sys.argv[1], set(sys.argv[2].split(",")), sys.argv[3]

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ImportError(f"{name} is not importable here")
        return None

sys.meta_path.insert(0, Refuse())
failures = {}
pkg = importlib.import_module(package)
for info in pkgutil.walk_packages(pkg.__path__, package + "."):
    if info.name.endswith("__main__"):
        continue  # runs the program; its import statements are checked by reading the source
    try:
        importlib.import_module(info.name)
    except ImportError as exc:
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith(root)]
        where = f"{frames[-1].filename[len(root) + 1:]}:{frames[-1].lineno}" if frames else "?"
        failures[info.name] = f"{where}: {exc}"
print(json.dumps({"failures": failures, "loaded": sorted(m for m in ("torch", "sounddevice") if m in sys.modules)}))
'''


@pytest.mark.parametrize("package", ["serve", "clients"])
def test_every_module_imports_with_the_lower_layers_unimportable(package):
    proc = subprocess.run([PY, "-c", _IMPORT_ALL, package, ",".join(FORBIDDEN[package]), str(ROOT)], cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result["failures"], "\n".join(f"{m}: {why}" for m, why in result["failures"].items())
    # torch never; sounddevice only when clients.mic records (it needs the PortAudio library)
    assert result["loaded"] == [], result["loaded"]
