"""sigterm_watchdog: SIGTERM ends a run even when its main thread is stuck in a collective.

Lightning handles SIGTERM in Python (stop at the next batch, forward the signal to the processes
it started, SaveOnInterrupt writes last.ckpt). A Python signal handler only runs when the main
thread executes Python code, and a process blocked in a collective that never completes (a peer
crashed or waits in a different one) never does: the signal is noted and the process waits on.
The C-level handler still writes the signal number to the wakeup fd, so a thread reading it
forwards SIGTERM to the child processes at once and, if the process is still alive `grace_s`
seconds later, kills those children and ends the process with status 143. A run that fails
kills the children still alive (Lightning leaves them to finish on their own, which a process
stuck outside a collective never does).

stop_workers: the same SIGTERM-then-SIGKILL for a sweep's worker processes (StopJobsOnSigterm in
hydra_callbacks), which waits for them to end instead of for the process itself.
"""

from __future__ import annotations

import contextlib
import multiprocessing.process
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import psutil

# Lightning's subprocess launcher starts Popen objects, the spawn launcher multiprocessing ones
Child = subprocess.Popen | multiprocessing.process.BaseProcess
ChildProcesses = Callable[[], list[Child]]


def _no_children() -> list[Child]:
    return []


def _alive(proc: Child) -> bool:
    return proc.poll() is None if isinstance(proc, subprocess.Popen) else proc.is_alive()


class Watchdog:
    def __init__(self, read_fd: int, grace_s: float) -> None:
        self.read_fd, self.grace_s = read_fd, grace_s
        self.children: ChildProcesses = _no_children

    def signal_children(self, signum: int) -> None:
        for proc in self.children():
            if _alive(proc) and proc.pid is not None:
                with contextlib.suppress(OSError):
                    os.kill(proc.pid, signum)

    def run(self) -> None:
        try:
            while True:
                data = os.read(self.read_fd, 512)
                if not data:  # the run ended and closed the pipe
                    return
                if signal.SIGTERM in data:
                    break
        finally:
            os.close(self.read_fd)
        self.signal_children(signal.SIGTERM)
        time.sleep(self.grace_s)
        os.write(
            2,
            f"\nSIGTERM: the run did not stop within {self.grace_s:g} s (a process waits in a collective "
            "that cannot complete); ending it now.\n".encode(),
        )
        self.signal_children(signal.SIGKILL)
        os._exit(128 + signal.SIGTERM)


@contextlib.contextmanager
def sigterm_watchdog(grace_s: float) -> Iterator[Watchdog | None]:
    """Watch for SIGTERM while the block runs; yields the watchdog (set its `children` to the
    processes to stop with this one), or None where it cannot be installed (not the main thread,
    or another wakeup fd is in use, e.g. an asyncio loop)."""
    if threading.current_thread() is not threading.main_thread() or grace_s < 0:
        yield None
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    if previous != -1:  # someone else's: leave it in place
        signal.set_wakeup_fd(previous)
        os.close(read_fd)
        os.close(write_fd)
        yield None
        return
    watchdog = Watchdog(read_fd, grace_s)
    threading.Thread(target=watchdog.run, name="sigterm-watchdog", daemon=True).start()
    try:
        yield watchdog
    except BaseException:
        # a failed run (e.g. a collective timed out) must not leave a stuck peer behind
        watchdog.signal_children(signal.SIGKILL)
        raise
    finally:
        signal.set_wakeup_fd(-1)
        os.close(write_fd)  # ends the thread, unless SIGTERM already came


def stop_workers(grace_s: float) -> None:
    """SIGTERM to this process's worker processes, then SIGKILL to those (and anything they
    started) still alive `grace_s` seconds later. Resource trackers ignore SIGTERM; they end with
    this process."""
    workers = [p for p in psutil.Process().children() if not _is_resource_tracker(p)]
    for worker in workers:
        with contextlib.suppress(psutil.Error):
            worker.terminate()
    _, alive = psutil.wait_procs(workers, timeout=grace_s)
    for worker in alive:
        with contextlib.suppress(psutil.Error):
            for process in [*worker.children(recursive=True), worker]:
                process.kill()


def _is_resource_tracker(process: psutil.Process) -> bool:
    try:
        return any("resource_tracker" in part for part in process.cmdline())
    except psutil.Error:
        return True
