"""One writer per run directory: a second process's writing verb is refused in one line, a dead owner's lock is
taken over, and the lock nests within one process."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from edge_tl.cli import main
from edge_tl.errors import EdgeTLError, RunLockedError
from edge_tl.finetune import FinetuneConfig, finetune
from edge_tl.run_lock import lock_path, run_lock

HOLDER = """
import sys
from edge_tl.run_lock import run_lock
with run_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()  # hold it until the test closes stdin
"""


@pytest.fixture
def held(tmp_path):
    """A run directory whose lock another live process holds; yields (run_dir, that process's pid)."""
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield run_dir, holder.pid
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
        holder.stdout.close()
    assert not lock_path(run_dir).exists()  # released when its holder finished


def test_a_second_process_is_refused_naming_the_holder(held, surface_dataset, capsys):
    run_dir, pid = held
    owner = json.loads(lock_path(run_dir).read_text())
    assert owner == {"pid": pid, "host": socket.gethostname()}
    with pytest.raises(RunLockedError, match=f"in use by process {pid} on {socket.gethostname()}"):
        finetune(surface_dataset, run_dir, FinetuneConfig(img_size=64, epochs=1))
    assert not run_dir.exists()  # refused before any work
    assert issubclass(RunLockedError, EdgeTLError) and RunLockedError.exit_code == 2
    for argv in (["quantize", str(run_dir)], ["prune", str(run_dir)], ["evaluate", str(run_dir), str(surface_dataset)]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        error = capsys.readouterr().err.strip()
        assert f"in use by process {pid}" in error and len(error.splitlines()) == 1, argv


def test_a_dead_process_lock_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=30)
    path = lock_path(run_dir)
    path.write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname()}))
    with run_lock(run_dir) as taken:
        assert taken == path and json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()
    path.write_text(json.dumps({"pid": gone.pid, "host": "another-host"}))  # its liveness cannot be checked here
    with pytest.raises(RunLockedError, match="on another-host"):
        with run_lock(run_dir):
            pass
    assert path.exists()


def test_the_lock_nests_in_one_process_and_removes_the_folders_it_made(tmp_path):
    run_dir = tmp_path / "new" / "deeper" / "run"
    with run_lock(run_dir) as path:
        with run_lock(tmp_path / "new" / "deeper" / "." / "run"):  # the same directory, spelt differently
            assert path.exists()
        assert path.exists()  # the inner exit keeps the outer hold
    assert not path.exists() and not (tmp_path / "new").exists()
