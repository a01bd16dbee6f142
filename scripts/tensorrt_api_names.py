"""Regenerate tests/tensorrt_api/*.txt: the names each TensorRT version's Python bindings define.

TensorRT itself needs a GPU, but its Python bindings are small wheels on PyPI whose compiled
module (``tensorrt_bindings/tensorrt.so``) holds every class, method, property and enum member
name as a NUL-terminated string (pybind11 registers them by name). This script downloads one
wheel per supported version with pip (no dependencies, binary only), scans the module for
those strings and writes one sorted list per version; tests/test_tensorrt_conformance.py checks
edge-tl's TensorRT calls against the lists without TensorRT or a download.

What a list holds, per line after the ``#`` header: every NUL-terminated printable string of the
module that is a Python identifier, or the identifier that ends a longer string (the linker
stores a string that is the tail of another only once, so ``INT8`` may exist only as the end of
``UINT8`` and ``DataType`` only as the end of ``nvinfer1::DataType``: a name is in the API when it
is a listed name or the end of one), less mangled C++ symbols (``_Z...``); plus the top-level
names of the wheel's ``tensorrt_bindings/__init__.py`` (``__version__``, ``nptype``, ``volume``).

    python scripts/tensorrt_api_names.py                  # download and rewrite every list
    python scripts/tensorrt_api_names.py --wheels DIR     # use wheels already in DIR
    python scripts/tensorrt_api_names.py --stubs .mypy-stubs   # tensorrt-stubs for mypy (see mypy.ini)

``--stubs`` installs tensorrt-stubs (10.13) into a folder of its own, not site-packages (a stub-only
``tensorrt`` folder on sys.path imports as an empty namespace package and looks like an installed
TensorRT), and repairs the two kinds of invalid syntax its generated ``.pyi`` files have: parameters
named by a keyword (``in``) and parameters without a default after one with a default.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import keyword
import logging
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

logger = logging.getLogger("tensorrt_api_names")

# (version as the list's name, pip requirement, the wheel's platform tag); CPython 3.11 wheels
WHEELS = (
    ("8.6.1", "tensorrt-bindings==8.6.1", "manylinux_2_17_x86_64"),
    ("10.3.0", "tensorrt-cu12-bindings==10.3.0", "manylinux_2_17_x86_64"),
    ("10.13.3.9", "tensorrt-cu12-bindings==10.13.3.9", "manylinux_2_28_x86_64"),
    ("11.4.0.106", "tensorrt-cu12-bindings==11.4.0.106", "manylinux_2_28_x86_64"),
)
MODULE = "tensorrt_bindings/tensorrt.so"
PACKAGE_INIT = "tensorrt_bindings/__init__.py"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "tests" / "tensorrt_api"
_C_STRING = re.compile(rb"([\x20-\x7e]{2,})\x00")
_TRAILING_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*$")


def module_names(data: bytes) -> set[str]:
    """Identifiers that are, or end, a NUL-terminated printable string of a compiled module."""
    names = set()
    for match in _C_STRING.finditer(data):
        text = match.group(1).decode("ascii")
        if text.startswith("_Z") or text.startswith("*_Z"):
            continue  # mangled C++ symbols: not Python names
        tail = _TRAILING_IDENTIFIER.search(text)
        if tail is not None:
            names.add(tail.group())
    return names


def package_names(source: str) -> set[str]:
    """Top-level names a package ``__init__.py`` defines (functions, classes, assignments)."""
    names = set()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(target.id for target in node.targets if isinstance(target, ast.Name))
    return names


def wheel_names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return module_names(archive.read(MODULE)) | package_names(archive.read(PACKAGE_INIT).decode("utf-8"))


def format_list(version: str, wheel: Path, names: set[str]) -> str:
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    header = [
        f"# TensorRT {version} Python API names, from {wheel.name}",
        f"# sha256 {digest}",
        "# regenerate: python scripts/tensorrt_api_names.py (a name is present if listed or the end of a listed name)",
    ]
    return "\n".join(header + sorted(names)) + "\n"


def download(requirement: str, platform: str, folder: Path) -> Path:
    before = set(folder.glob("*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.11", "--platform", platform, "-d", str(folder), requirement], check=True)
    found = sorted(set(folder.glob("*.whl")) - before) or sorted(_matching(folder, requirement))
    if len(found) != 1:
        raise SystemExit(f"pip download {requirement} gave {len(found)} wheels in {folder}, expected 1")
    return found[0]


def _matching(folder: Path, requirement: str) -> list[Path]:
    project, _, version = requirement.partition("==")
    return list(folder.glob(f"{project.replace('-', '_')}-{version}-*.whl"))


STUBS = "tensorrt-stubs==10.13.0.35.1"
_KEYWORD_PARAMETER = re.compile(r"([(,] ?)(" + "|".join(keyword.kwlist) + r")(: )")


def repair_stub(source: str) -> str:
    """``source`` with keyword parameters renamed (``in`` -> ``in_``) and, in any ``def`` line
    Python rejects for a parameter without a default after a defaulted one, ``= ...`` added."""
    lines = [_KEYWORD_PARAMETER.sub(r"\1\2_\3", line) if line.lstrip().startswith("def ") else line
             for line in source.split("\n")]
    for _ in range(len(lines)):
        try:
            ast.parse("\n".join(lines))
            return "\n".join(lines)
        except SyntaxError as err:
            index = (err.lineno or 0) - 1
            head, sep, tail = lines[index].partition("(")
            if not head.lstrip().startswith("def ") or not sep:
                raise
            arguments, close, rest = tail.rpartition(")")
            parts, seen_default = [], False
            for part in arguments.split(", "):
                seen_default = seen_default or "=" in part
                parts.append(part if "=" in part or not seen_default or part.startswith("*") else f"{part} = ...")
            lines[index] = f"{head}({', '.join(parts)}{close}{rest}"
    raise SystemExit("could not repair the stubs")


def install_stubs(folder: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--upgrade", "--target", str(folder), STUBS],
                   check=True)
    for stub in sorted(folder.glob("tensorrt*/**/*.pyi")):
        source = stub.read_text(encoding="utf-8")
        repaired = repair_stub(source)
        if repaired != source:
            stub.write_text(repaired, encoding="utf-8")
            logger.info("repaired %s", stub)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", type=Path, default=None, help="folder with the wheels (default: download them)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"where the lists go (default {DEFAULT_OUT})")
    parser.add_argument("--stubs", type=Path, default=None, help=f"install {STUBS} (repaired) here instead")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.stubs is not None:
        install_stubs(args.stubs)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.wheels or Path(scratch)
        for version, requirement, platform in WHEELS:
            matching = _matching(folder, requirement)
            wheel = matching[0] if len(matching) == 1 else download(requirement, platform, folder)
            names = wheel_names(wheel)
            path = args.out / f"tensorrt-{version}.txt"
            path.write_text(format_list(version, wheel, names), encoding="ascii")
            logger.info("%s: %d names from %s", path, len(names), wheel.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
