"""The Ray session of a driver: started (or joined) once per process, and, when started here, never
outliving the driver.

`ensure_ray` starts a local Ray on 127.0.0.1 without dashboard unless an `address` is given ('auto' joins a
cluster started with `ray start`); it never shuts Ray down itself, because several pools may share it. A local
Ray goes down with its driver: SIGTERM/SIGINT/SIGHUP shut it down first, then take their usual course, and a
driver killed outright is cleaned up after by core/ray_reaper.py. Split from core/pools.py, which calls it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP")  # the signals after which a local Ray must not outlive us
_reapers: list = []  # the reaper processes started here (kept referenced while they wait)
_restore: dict = {}  # signal -> its handler from before ensure_ray started a local Ray
_ray_owner = [0]  # pid of the process that started it (forked children inherit the handlers, not the Ray)


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start (or join) Ray once per process: local on 127.0.0.1 without dashboard, or `address`.

    A local Ray started here goes down with the driver: on SIGTERM/SIGINT/SIGHUP the driver shuts it
    down before the signal takes its usual course, and if the driver is killed outright a small
    reaper process (core/ray_reaper.py) stops what Ray's own fate-sharing leaves behind."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if address is None:
        before = _signal_handlers()  # ray.init replaces the SIGTERM handler; ours restores the one from before
        context = ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                           log_to_driver=True)  # fmt: skip
        _shut_down_on_signals(before)
        _start_reaper(context.address_info["session_dir"], os.path.dirname(ray.__file__))
    else:
        ray.init(address=address)


def _signal_handlers() -> dict:
    """signal number -> current handler for each of STOP_SIGNALS that this platform has, that has a
    handler Python can put back, and that the process does not ignore (under nohup SIGHUP stays ignored)."""
    handlers = {}
    for name in STOP_SIGNALS:
        number = getattr(signal, name, None)  # Windows has no SIGHUP
        handler = signal.getsignal(number) if number is not None else None
        if handler is not None and handler != signal.SIG_IGN:
            handlers[number] = handler
    return handlers


def _stop_signal(signum: int, frame: object) -> None:
    """Put the handlers of `_restore` back, shut Ray down, then raise the signal again so that it ends
    the process as it would have without Ray (KeyboardInterrupt for SIGINT; by default, death by the
    signal for SIGTERM and SIGHUP)."""
    import ray

    for number, handler in _restore.items():
        signal.signal(number, handler)
    _restore.clear()
    try:
        if os.getpid() == _ray_owner[0]:  # a forked child (e.g. a data-loader worker) must not stop our Ray
            ray.shutdown()
    finally:
        signal.raise_signal(signum)


def _shut_down_on_signals(previous: dict) -> None:
    """`_stop_signal` on each signal of `previous` (signal -> handler to put back). Only the main thread
    may set handlers; a Ray restarted in this process keeps the handlers from before the first one."""
    if threading.current_thread() is not threading.main_thread():
        return
    _ray_owner[0] = os.getpid()
    for number, handler in previous.items():
        if handler is not _stop_signal:
            _restore[number] = handler
        signal.signal(number, _stop_signal)


def _start_reaper(session_dir: str, ray_dir: str) -> None:
    """core/ray_reaper.py, watching this process: it stops the session's leftovers once we are gone.
    Linux only (it reads /proc); its own session, so a terminal's Ctrl-C or hang-up does not stop it first."""
    if not sys.platform.startswith("linux"):
        return
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ray_reaper.py")
    _reapers.append(subprocess.Popen(
        [sys.executable, "-I", script, str(os.getpid()), session_dir, ray_dir], stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    ))  # fmt: skip
