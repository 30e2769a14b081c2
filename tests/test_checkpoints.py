"""Checkpoint files check themselves, a damaged newest one falling back to the previous one; portable
files check their tensors and metadata."""

import json

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save

from expert_core import checkpoints, portable
from expert_core.config import get_preset, to_dict
from expert_core.files import arrays_checksum

from model_configs import random_canonical_tensors

TINY = get_preset("tiny").model


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


def test_a_run_started_again_beside_later_damaged_checkpoints_keeps_its_own(tmp_path):
    for epoch in (21, 22):  # unusable: the run that finds them starts from the beginning
        checkpoints.checkpoint_path(tmp_path, epoch).write_bytes(b"damaged")
    for epoch in (1, 2, 3):
        write(tmp_path, epoch)
        assert checkpoints.checkpoint_path(tmp_path, epoch).exists()
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == [
        "checkpoint-00002.ckpt", "checkpoint-00003.ckpt", "checkpoint-00021.ckpt", "checkpoint-00022.ckpt"]


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


def test_portable_metadata_edited_after_writing_is_refused(tmp_path):
    path = tmp_path / "weights.safetensors"
    portable.save_portable(path, random_canonical_tensors(TINY), TINY, {"temperature": 1.0})
    with safe_open(str(path), framework="numpy") as f:
        metadata, tensors = f.metadata(), {key: f.get_tensor(key) for key in f.keys()}
    path.write_bytes(save(tensors, metadata={**metadata, "extra": json.dumps({"temperature": 4.0})}))
    with pytest.raises(portable.UnreadableWeightsError, match="contents that do not match the file's checksum"):
        portable.load_portable(path)


def test_version_2_portable_files_still_load(tmp_path):
    """Version 2 checked the tensors only; the runs under results/ were written in it."""
    tensors = random_canonical_tensors(TINY)
    metadata = {"format": portable.FORMAT, "format_version": "2", "model_config": json.dumps(to_dict(TINY)),
                "extra": json.dumps({"epochs": 3}), "tensors_sha256": arrays_checksum(tensors)}
    (tmp_path / "v2.safetensors").write_bytes(save(tensors, metadata=metadata))
    loaded, config, extra = portable.load_portable(tmp_path / "v2.safetensors")
    assert config == TINY and extra == {"epochs": 3}
    assert all(np.array_equal(loaded[key], value) for key, value in tensors.items())
