"""Atomic writes, hashes, run directories and safetensors checkpoints.

Every artifact is written to a temporary file in its destination folder and renamed into place,
so an interrupted stage never leaves a half-written file. A new run directory is built in a
hidden sibling folder and renamed into place when the stage succeeds.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

from edge_tl.errors import ArtifactError


def _atomic_target(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    fd, tmp = _atomic_target(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_output_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path for a writer that needs a file name (ONNX, engines); rename on success."""
    path = Path(path)
    fd, tmp = _atomic_target(path)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; run the stage that writes it first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path} is not valid JSON ({err.msg}); delete it and rerun its stage") from err


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_text(lines: list[str] | tuple[str, ...]) -> str:
    """Hash of a list of strings (file lists, settings), independent of platform line endings."""
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def check_new_run_dir(path: str | os.PathLike, force: bool) -> Path:
    """Validate an output run directory before any work: it must be new, empty, or ``force``d."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ArtifactError(f"--out {path} is a file, not a directory; choose another path")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise ArtifactError(f"run directory {path} already exists and is not empty; pass --force to overwrite it")
    return path


@contextlib.contextmanager
def staged_run_dir(path: str | os.PathLike, force: bool) -> Iterator[Path]:
    """Build a run directory in a hidden sibling and move it into place only if the body succeeds."""
    path = check_new_run_dir(path, force).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield staging
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def save_weights(path: str | os.PathLike, state_dict: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> Path:
    """Save a state dict as safetensors, atomically. Tensors are made contiguous and detached."""
    from safetensors.torch import save

    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in state_dict.items()}
    return atomic_write_bytes(path, save(tensors, metadata=dict(metadata or {})))


def load_weights(path: str | os.PathLike) -> dict:
    """Load a safetensors state dict (never a pickle)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"weights file {path} is missing; rerun the stage that writes it")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own SafetensorError and OSError variants
        raise ArtifactError(f"{path} is not a readable safetensors file ({err}); rerun its stage") from err
