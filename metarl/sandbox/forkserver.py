"""The sandbox's fork server: one trusted child per parent process that imports torch once
and forks a worker for every :class:`~metarl.sandbox.Sandbox` (about 20 ms each instead of
the 2-3 s of a fresh interpreter). The child side is ``child.py`` beside this file.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from metarl.sandbox.base import SandboxError

_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "child.py")
NOBODY = 65534
#: The environment of every child, whole: nothing is taken from ``os.environ``.
_CHILD_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1",
              "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


# -- the fork server -----------------------------------------------------------------------


class _ForkServer:
    """The trusted child that imports torch once and forks one worker per sandbox."""

    def __init__(self, timeout: float):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-B", _CHILD, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), env=dict(_CHILD_ENV), cwd="/",
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                start_new_session=True,
            )
        finally:
            theirs.close()
        self.sock = ours
        self.owner = os.getpid()
        self.cond = threading.Condition()
        self.send_lock = threading.Lock()
        self.replies: dict[int, dict] = {}
        self.exits: dict[int, dict] = {}
        self.ignore: set[int] = set()
        self.dead = False
        self.next_id = 0
        self.sock.settimeout(timeout)
        try:
            hello = json.loads(self.sock.recv(1 << 16))["hello"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            why = "did not start in time" if isinstance(e, TimeoutError) else "failed to start"
            self.shutdown()
            raise SandboxError(f"the sandbox's fork server {why} (start_timeout_s={timeout}; "
                               f"it imports torch): {self.stderr_tail()}") from None
        self.sock.settimeout(None)
        self.footprint_mb = float(hello["vm_mb"])
        threading.Thread(target=self._read, name="sandbox-forkserver", daemon=True).start()

    def stderr_tail(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return "(still running)"
        try:
            return self.proc.stderr.read(8192).decode(errors="replace")[-2000:] or \
                f"(exit status {self.proc.returncode}, no output)"
        except OSError:
            return f"(exit status {self.proc.returncode})"

    def _read(self):
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except OSError:
                data = b""
            with self.cond:
                if not data:
                    self.dead = True
                    self.cond.notify_all()
                    return
                msg = json.loads(data)
                if "id" in msg:
                    self.replies[msg["id"]] = msg
                elif "exit" in msg:
                    pid = msg["exit"]
                    if pid in self.ignore:
                        self.ignore.discard(pid)
                    else:
                        self.exits[pid] = msg
                self.cond.notify_all()

    @property
    def alive(self) -> bool:
        return not self.dead and self.proc.poll() is None and self.owner == os.getpid()

    def fork(self, spec: dict, fds: list[int], deadline: float) -> int:
        with self.send_lock:
            self.next_id += 1
            rid = self.next_id
            try:
                socket.send_fds(self.sock, [json.dumps({"op": "fork", "id": rid,
                                                        "spec": spec}).encode()], fds)
            except OSError as e:
                raise SandboxError(f"the sandbox's fork server is gone: {e}") from None
        with self.cond:
            while rid not in self.replies:
                left = deadline - time.monotonic()
                if self.dead or left <= 0:
                    raise SandboxError("the sandbox's fork server did not answer")
                self.cond.wait(min(left, 0.5))
            reply = self.replies.pop(rid)
        if "error" in reply:
            raise SandboxError(f"the sandbox's fork server could not fork: {reply['error']}")
        return int(reply["pid"])

    def exit_status(self, pid: int, timeout: float) -> dict | None:
        """The worker's exit report (status, CPU seconds, peak memory), once it has ended."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while pid not in self.exits and not self.dead:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)
            return self.exits.get(pid)

    def exited(self, pid: int) -> bool:
        with self.cond:
            return pid in self.exits

    def forget(self, pid: int) -> None:
        with self.cond:
            if self.exits.pop(pid, None) is None:
                self.ignore.add(pid)

    def shutdown(self):
        try:
            self.sock.close()  # the server kills its workers and exits on EOF
        except OSError:
            pass
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            self.proc.wait()


_server: _ForkServer | None = None
_server_lock = threading.Lock()


def _fork_server(timeout: float) -> _ForkServer:
    global _server
    with _server_lock:
        if _server is None or not _server.alive:
            if _server is not None and _server.owner == os.getpid():
                _server.shutdown()
            _server = _ForkServer(timeout)
        return _server


@atexit.register
def _stop_fork_server():
    if _server is not None and _server.owner == os.getpid():
        _server.shutdown()


def _netns(pid: int | str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None
