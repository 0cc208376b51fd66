"""Stop what is left of one local Ray session once the driver that started it is gone, even by SIGKILL.

`core.ray_session.ensure_ray` starts this file as a script (standard library only, so it starts in
milliseconds) right after it starts a local Ray:

    python ray_reaper.py DRIVER_PID SESSION_DIR RAY_PACKAGE_DIR

It waits until its parent is no longer DRIVER_PID (the kernel re-parents it when the driver dies,
however it dies), then stops that session's processes: SIGTERM, and SIGKILL after a short grace.
Why it is needed: Ray's own fate-sharing (PR_SET_PDEATHSIG) takes gcs_server and raylet down with a
killed driver, but the agents the raylet started (ray::DashboardAgent, ray::RuntimeEnvAgent) and idle
workers outlive it. A session's processes are Ray's (named `ray::...` or run from Ray's package
directory) whose command line names the session directory or that hold a file open inside it; other
sessions (other drivers, other users) never match.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import time


def _cmdline(proc: str, pid: str) -> str:
    with open(os.path.join(proc, pid, "cmdline"), "rb") as f:
        return f.read().replace(b"\0", b" ").decode("utf-8", "replace")


def _holds_file_under(proc: str, pid: str, directory: str) -> bool:
    fd_dir = os.path.join(proc, pid, "fd")
    for fd in os.listdir(fd_dir):
        try:
            if os.readlink(os.path.join(fd_dir, fd)).startswith(directory + os.sep):
                return True
        except OSError:  # closed meanwhile
            continue
    return False


def session_pids(session_dir: str, ray_dir: str, proc: str = "/proc", exclude: int | None = None) -> list[int]:
    """Pids of the Ray processes of the session in `session_dir` (see the module docstring)."""
    names_session = re.compile(re.escape(session_dir) + r"(?![\w.-])")  # not a longer session name
    found = []
    for pid in os.listdir(proc):
        if not pid.isdigit() or int(pid) == exclude:
            continue
        try:
            cmd = _cmdline(proc, pid)
            is_ray = cmd.startswith("ray::") or ray_dir + os.sep in cmd
            if is_ray and (names_session.search(cmd) or _holds_file_under(proc, pid, session_dir)):
                found.append(int(pid))
        except OSError:  # gone meanwhile, or another user's process
            continue
    return sorted(found)


def is_running(pid: int, proc: str = "/proc") -> bool:
    """Whether `pid` exists and is not a zombie (a zombie is dead, only not yet waited for)."""
    try:
        with open(os.path.join(proc, str(pid), "stat")) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stop(pids: list[int], grace_s: float = 2.0) -> None:
    """SIGTERM each of `pids`, then SIGKILL those still running after `grace_s` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(OSError):  # already gone
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(is_running(p) for p in pids):
            time.sleep(0.05)
        pids = [p for p in pids if is_running(p)]
        if not pids:
            return


def main(argv: list[str]) -> int:
    driver, session_dir, ray_dir = int(argv[1]), argv[2], argv[3]
    while os.getppid() == driver:
        time.sleep(0.25)
    time.sleep(0.5)  # let Ray's own fate-sharing and the driver's cleanup go first
    stop(session_pids(session_dir, ray_dir, exclude=os.getpid()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
