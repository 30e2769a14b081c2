"""Atomic writes: whole files only, even with two writers of one path at once."""

import pytest

from expert_core.files import atomic_write_bytes, atomic_writer


def test_two_overlapping_writers_of_one_path_each_land_whole(tmp_path):
    # Two runs building the same dataset cache: the writer that finishes last wins, neither fails.
    target = tmp_path / "cache.npz"
    with atomic_writer(target) as first:
        first.write(b"first, ")
        with atomic_writer(target) as second:
            second.write(b"second")
        assert target.read_bytes() == b"second"
        first.write(b"still writing")
    assert target.read_bytes() == b"first, still writing"
    assert [p.name for p in tmp_path.iterdir()] == ["cache.npz"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "summary.json"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_writer(target) as f:
            f.write(b"half of the new")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
