"""Checkpoint files check themselves; a damaged newest one falls back to the previous one."""

import pytest

from expert_core import checkpoints


def write(run_dir, epoch, payload=b"state"):
    return checkpoints.write_checkpoint(run_dir, epoch, {"framework": "test", "history": []}, payload * epoch)


def test_round_trip_keeps_header_and_payload(tmp_path):
    path = write(tmp_path, 3)
    checkpoint = checkpoints.read_checkpoint(path)
    assert checkpoint.payload == b"state" * 3
    assert checkpoint.header["epoch"] == 3 and checkpoint.header["framework"] == "test"


def test_only_the_newest_two_are_kept(tmp_path):
    for epoch in range(1, 5):
        write(tmp_path, epoch)
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == [
        "checkpoint-00003.ckpt", "checkpoint-00004.ckpt"]
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("damage", ["truncate", "flip_payload_byte", "garbage", "empty", "bad_header"])
def test_damaged_newest_is_reported_and_previous_used(tmp_path, damage):
    write(tmp_path, 1)
    newest = write(tmp_path, 2)
    blob = newest.read_bytes()
    damaged = {
        "truncate": blob[:-3],
        "flip_payload_byte": blob[:-1] + bytes([blob[-1] ^ 1]),
        "garbage": b"\x00\xff" * 40,
        "empty": b"",
        "bad_header": checkpoints.MAGIC + b"{not json\n" + b"payload",
    }[damage]
    newest.write_bytes(damaged)
    with pytest.raises(checkpoints.CheckpointError, match=str(newest)):
        checkpoints.read_checkpoint(newest)
    with pytest.warns(UserWarning, match="checkpoint-00002"):
        checkpoint = checkpoints.latest_checkpoint(tmp_path)
    assert checkpoint.header["epoch"] == 1


def test_no_checkpoint_gives_none(tmp_path):
    assert checkpoints.latest_checkpoint(tmp_path) is None
