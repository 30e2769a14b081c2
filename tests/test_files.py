"""Atomic writes: whole files only, even with two writers of one path at once; a dead writer's
temporary is cleaned up."""

import os

import pytest

from expert_core.files import atomic_write_bytes, atomic_writer, partial_path, remove_abandoned_partials


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


def test_only_the_temporaries_of_dead_writers_on_this_host_are_removed(tmp_path):
    live = partial_path(tmp_path / "checkpoint-00002.ckpt")  # this process's own
    host = live.name.split(".")[-2].split("-")[0]
    dead = tmp_path / f"checkpoint-00001.ckpt.{host}-4194305-0badc0de.partial"  # above Linux's largest pid
    another_host = "00000000" if host != "00000000" else "11111111"
    other_host = tmp_path / f"cache.npz.{another_host}-4194305-0badc0de.partial"
    unrelated = tmp_path / "notes.partial"
    for path in (dead, live, other_host, unrelated):
        path.write_bytes(b"half")
    assert live.name.startswith(f"checkpoint-00002.ckpt.{host}-{os.getpid()}-")
    assert remove_abandoned_partials(tmp_path) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other_host.name, unrelated.name])
