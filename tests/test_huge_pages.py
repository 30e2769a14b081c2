"""The training scripts' one relaunch with glibc's huge-page malloc (expert_core.huge_pages)."""

import os
import subprocess
import sys

import pytest

from expert_core.huge_pages import TUNABLE

# The child reads the kernel's setting from THP_FILE: every case runs, whatever this machine's own setting.
CHILD = ("import os, pathlib; from expert_core import huge_pages; "
         "huge_pages.THP_SETTING = pathlib.Path(os.environ['THP_FILE']); "
         "huge_pages.relaunch_with_huge_pages(); print(os.environ.get('GLIBC_TUNABLES'))")

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables are Linux's")


def run_child(thp_file, **env_extra) -> str:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | {"THP_FILE": str(thp_file)} | env_extra
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.parametrize("setting, expected", [
    ("always [madvise] never\n", TUNABLE), ("[always] madvise never\n", TUNABLE),
    ("always madvise [never]\n", "None"), (None, "None")], ids=["madvise", "always", "never", "no-such-file"])
def test_relaunches_once_with_the_tunable_where_huge_pages_exist(tmp_path, setting, expected):
    thp_file = tmp_path / "enabled"
    if setting is not None:
        thp_file.write_text(setting)
    assert run_child(thp_file) == expected


def test_a_users_own_glibc_tunables_are_left_alone(tmp_path):
    thp_file = tmp_path / "enabled"
    thp_file.write_text("[always] madvise never\n")
    assert run_child(thp_file, GLIBC_TUNABLES="glibc.malloc.arena_max=2") == "glibc.malloc.arena_max=2"
