"""The test harness's own clean-up: a product process killed with SIGKILL leaves its children
(a worker's spawned decode pool processes) behind unless its process group is killed too."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from tests.conftest import kill_group


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"  # a zombie is gone, only not reaped
    except FileNotFoundError:
        return False


def test_kill_group_ends_what_a_killed_process_left_behind() -> None:
    # A parent that starts a child and reports its pid, in a session (process group) of its own,
    # as tests.conftest.Proc starts the agent and the worker.
    parent = subprocess.Popen(
        ["sh", "-c", "sleep 300 & echo $!; exec sleep 300"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        parent.kill()  # kill -9 of the parent only, as a test does to a worker
        parent.wait(timeout=10)
        assert _alive(child)  # the orphan lives on: what leaked before
        kill_group(parent.pid)
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child)
        kill_group(parent.pid)  # nothing left: no error
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)
