"""The training scripts' one relaunch with glibc's huge-page malloc (expert_core.huge_pages)."""

import os
import subprocess
import sys

from expert_core.huge_pages import THP_SETTING, TUNABLE

CHILD = ("import os; from expert_core.huge_pages import relaunch_with_huge_pages; "
         "relaunch_with_huge_pages(); print(os.environ.get('GLIBC_TUNABLES'))")


def run_child(**env_extra) -> str:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | env_extra
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_relaunches_once_with_the_tunable_where_huge_pages_exist():
    available = sys.platform.startswith("linux") and THP_SETTING.exists() and "[never]" not in THP_SETTING.read_text()
    assert run_child() == (TUNABLE if available else "None")


def test_a_users_own_glibc_tunables_are_left_alone():
    assert run_child(GLIBC_TUNABLES="glibc.malloc.arena_max=2") == "glibc.malloc.arena_max=2"
