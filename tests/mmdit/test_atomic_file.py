"""Atomic publication: the destination holds the old contents or the new, never a mix, and no
temporary is left behind."""

from __future__ import annotations

import os

import pytest

from mmdit.atomic_file import (
    atomic_directory,
    atomic_path,
    publish,
    stage_file,
    temp_name,
    write_atomic,
)


def test_write_atomic_replaces_a_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "a.json"
    write_atomic(path, "old")
    write_atomic(path, b"new", fsync=False)
    assert path.read_text() == "new"
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]


def test_a_staged_file_is_invisible_until_published(tmp_path):
    path = tmp_path / "latest"
    tmp = stage_file(path, "step_2\n")
    assert not path.exists() and tmp.parent == tmp_path and tmp.name.endswith(".tmp")
    publish(tmp, path)
    assert path.read_text() == "step_2\n" and not tmp.exists()


def test_atomic_path_publishes_on_success_and_removes_on_error(tmp_path):
    out = tmp_path / "model.safetensors"
    stale = temp_name(out)
    stale.write_text("a crashed run's leftover")
    with atomic_path(out) as tmp:
        assert not tmp.exists()  # cleared for writers that create the file themselves
        tmp.write_text("weights")
    assert out.read_text() == "weights"
    with pytest.raises(RuntimeError), atomic_path(out) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer died")
    assert out.read_text() == "weights"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_atomic_directory_replaces_a_tree_wholesale(tmp_path):
    out = tmp_path / "components"
    out.mkdir()
    (out / "old.txt").write_text("previous")
    with atomic_directory(out) as tmp:
        (tmp / "new.txt").write_text("fresh")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert os.stat(out).st_mode & 0o777 == 0o755
    assert [p.name for p in tmp_path.iterdir()] == ["components"]


def test_a_failed_directory_swap_puts_the_old_tree_back(tmp_path, monkeypatch):
    out = tmp_path / "data"
    out.mkdir()
    (out / "old.txt").write_text("previous")
    real_replace = os.replace

    def replace(src, dst):
        if os.fspath(dst) == os.fspath(out) and ".tmp-" in os.path.basename(src):
            raise OSError("simulated rename failure")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="simulated"), atomic_directory(out) as tmp:
        (tmp / "new.txt").write_text("fresh")
    assert [p.name for p in tmp_path.iterdir()] == ["data"]
    assert [p.name for p in out.iterdir()] == ["old.txt"]
