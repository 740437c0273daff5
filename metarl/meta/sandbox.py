"""Run untrusted drift-function source code in a sandboxed child process.

A language model proposes the source of a drift function (the regulariser of PPO's
objective, see :mod:`metarl.algorithms.drift`). That code runs only in a child process;
this process keeps the environments, the agents, the returns and the fitness, and asks the
child for nothing but the drift and its derivative in ``ratio`` on tensors it sends.

Public API:

- :class:`SandboxLimits`: the child's limits (wall and CPU time, memory, processes, output,
  open files).
- :class:`ProposalError`: the proposal failed; ``reason`` is a short category and
  ``message`` a text meant to be shown to the model that wrote the code.
- :class:`SandboxError`: the sandbox itself failed (not the proposal's fault).
- :class:`DriftSandbox`: one proposal in one child process; ``call(ratio, advantage,
  clip_eps) -> (drift, grad)``.
- :class:`SandboxedDrift`: a :class:`~metarl.algorithms.drift.Drift` backed by a started
  sandbox, for :func:`metarl.inner.ppo.train`.
- :func:`validate_drift`: the checks a proposal must pass before training.

docs/sandbox.md says what the isolation does and what it does not protect against.

How a child is made: a fork server (``_sandbox_child.py``, started once per parent process
with an empty environment) imports torch once; each :meth:`DriftSandbox.start` has it fork a
worker, which isolates itself (session, resource limits, network and mount namespaces, uid
nobody, audit hook) before it reads the proposal. Replies come back as a JSON line plus raw
float32 bytes; nothing the child sends is ever unpickled.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from metarl.algorithms.drift import Drift

__all__ = ["DriftSandbox", "ProposalError", "SandboxError", "SandboxLimits", "SandboxedDrift",
           "validate_drift"]

_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_child.py")
NOBODY = 65534
#: The environment of every child, whole: nothing is taken from ``os.environ``.
_CHILD_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1",
              "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
_MESSAGE_CHARS = 2000  # an error message's length, at most
_OUTPUT_KEEP = 4096  # bytes of the child's output kept (the last ones)
_FILE_BYTES = 64 << 20  # RLIMIT_FSIZE
_MAX_CODE_CHARS = 200_000
_MAX_HEADER = 1 << 16  # the longest JSON line accepted from a child
_HEADROOM_MB = 256  # memory_mb must exceed the child's footprint after importing torch by this

REASONS = ("syntax", "signature", "runtime", "timeout", "memory", "cpu", "output", "died",
           "nan", "shape", "constraint", "forbidden", "protocol")


# -- limits and errors ---------------------------------------------------------------------


@dataclass(frozen=True)
class SandboxLimits:
    """What one sandboxed child may use.

    - ``wall_s``: the child's whole life, in seconds (enforced by the parent).
    - ``call_timeout_s``: one request (one evaluation of the drift function).
    - ``start_timeout_s``: loading the proposal: compiling it and running its top-level
      code. The child's own set-up before that (fork, isolation) is bounded by
      ``max(start_timeout_s, 30)`` and the fork server's one-time start (importing torch)
      by ``max(start_timeout_s, 60)``.
    - ``cpu_s``: CPU seconds (``RLIMIT_CPU``; SIGXCPU at the limit, SIGKILL 5 s later).
    - ``memory_mb``: address space (``RLIMIT_AS``), including the ~1.1 GB that torch maps.
    - ``nproc``: processes and threads of the sandbox's user (``RLIMIT_NPROC``).
    - ``output_bytes``: stdout plus stderr; more and the child is killed.
    - ``open_files``: file descriptors (``RLIMIT_NOFILE``).
    """

    wall_s: float = 1800.0
    call_timeout_s: float = 60.0
    start_timeout_s: float = 60.0
    cpu_s: int = 1800
    memory_mb: int = 4096
    nproc: int = 64
    output_bytes: int = 1_000_000
    open_files: int = 256

    def __post_init__(self):
        for name in ("wall_s", "call_timeout_s", "start_timeout_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (
                    math.isfinite(v) and v > 0):
                raise ValueError(f"SandboxLimits.{name} must be a positive number of seconds, "
                                 f"got {v!r}")
        minimum = {"cpu_s": 1, "memory_mb": 512, "nproc": 1, "output_bytes": 1024,
                   "open_files": 16}
        for name, low in minimum.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"SandboxLimits.{name} must be an integer >= {low}, "
                                 f"got {v!r}")


class ProposalError(Exception):
    """The proposed code failed: it does not compile, has the wrong shape, raised, ran out of
    time or memory, did something forbidden, or broke a drift constraint.

    ``reason`` is one of :data:`REASONS`; ``message`` says what happened in words meant for
    the model that wrote the code (with the end of the child's traceback when there is one);
    ``output`` is the end of what the child printed (at most a few KB).
    """

    def __init__(self, reason: str, message: str, output: str = ""):
        if reason not in REASONS:
            reason = "runtime"
        message = _clip(str(message), _MESSAGE_CHARS)
        super().__init__(message)
        self.reason, self.message, self.output = reason, message, output

    def __str__(self):
        return f"[{self.reason}] {self.message}"


class SandboxError(RuntimeError):
    """The sandbox machinery failed (the fork server did not start, a pipe broke while no
    proposal code could have run): not something the proposal can be blamed for."""


def _clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters: its first line, then as much of its end."""
    if len(text) <= limit:
        return text
    head = text.split("\n", 1)[0][: limit // 4]
    return head + "\n[...]\n" + text[-(limit - len(head) - 7):]


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


# -- one sandbox ---------------------------------------------------------------------------


class DriftSandbox:
    """One proposal, loaded in one isolated child process.

    Use as a context manager (or call :meth:`start` and :meth:`close`)::

        with DriftSandbox(code) as sandbox:
            drift, grad = sandbox.call(ratio, advantage, 0.2)

    :meth:`start` raises :class:`ProposalError` if the code does not load (syntax, not
    exactly one three-parameter function, top-level code that raises, loops, or does
    something forbidden). After a start, ``isolation`` says what isolation the child got
    (e.g. ``{"network": "namespace", "user": "nobody", ...}``) and ``function`` the name of
    the proposal's function.

    A call that raises inside the proposal or returns the wrong shape leaves the child
    running; anything else (timeout, death, output flood, forbidden action, broken
    protocol) kills it, and later calls raise the same :class:`ProposalError`.
    """

    def __init__(self, code: str, limits: SandboxLimits | None = None):
        if not isinstance(code, str):
            raise TypeError(f"code must be a str of Python source, got {type(code).__name__}")
        if limits is None:
            limits = SandboxLimits()
        if not isinstance(limits, SandboxLimits):
            raise TypeError(f"limits must be a SandboxLimits, got {type(limits).__name__}")
        self.code, self.limits = code, limits
        self.isolation: dict = {}
        self.function: str | None = None
        self.pid: int | None = None
        self.workdir: str | None = None
        self._state = "new"  # new -> running -> (dead) -> closed
        self._error: ProposalError | None = None
        self._server: _ForkServer | None = None
        self._lock = threading.Lock()
        self._kill_lock = threading.Lock()
        self._req = self._rep = None
        self._rbuf = bytearray()
        self._out = bytearray()
        self._out_total = 0
        self._out_lock = threading.Lock()
        self._drain: threading.Thread | None = None
        self._flooded = self._wall_exceeded = self._killed = self._hello = False
        self._wall_deadline = math.inf
        self._own_netns = _netns("self")
        self._child_netns: str | None = None

    # ---- life cycle --------------------------------------------------------------------

    def __enter__(self) -> DriftSandbox:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __repr__(self):
        return f"DriftSandbox(state={self._state!r}, pid={self.pid}, function={self.function!r})"

    @property
    def running(self) -> bool:
        return self._state == "running"

    @property
    def output(self) -> str:
        """The end of what the child wrote to stdout and stderr (at most a few KB)."""
        with self._out_lock:
            return bytes(self._out).decode("utf-8", errors="replace")

    def start(self) -> DriftSandbox:
        """Start the child and load the proposal; raises :class:`ProposalError` if it does
        not load (the sandbox is then closed)."""
        if self._state != "new":
            raise RuntimeError(f"start() on a sandbox that is {self._state}")
        self._state = "starting"
        limits = self.limits
        try:
            if len(self.code) > _MAX_CODE_CHARS:
                raise ProposalError("syntax", f"the source is {len(self.code)} characters "
                                              f"long; the limit is {_MAX_CODE_CHARS}")
            self._server = server = _fork_server(max(limits.start_timeout_s, 60.0))
            need = math.ceil(server.footprint_mb) + _HEADROOM_MB
            if limits.memory_mb < need:
                raise ValueError(
                    f"SandboxLimits.memory_mb={limits.memory_mb} is too small: the child maps "
                    f"{server.footprint_mb:.0f} MB once torch is imported; use at least {need}"
                )
            # The worker's own set-up is trusted code and gets a generous bound; the
            # proposal's loading gets start_timeout_s from the moment it is sent.
            deadline = time.monotonic() + max(limits.start_timeout_s, 30.0)
            self.workdir = tempfile.mkdtemp(prefix="metarl-sandbox-")
            root = os.geteuid() == 0
            if root:
                os.chown(self.workdir, NOBODY, NOBODY)
            req_r, self._req = os.pipe()
            self._rep, rep_w = os.pipe()
            out_r, out_w = os.pipe()
            spec = {"workdir": self.workdir, "limits": asdict(limits),
                    "file_bytes": _FILE_BYTES, "uid": NOBODY if root else None,
                    "gid": NOBODY if root else None}
            try:
                self.pid = server.fork(spec, [req_r, rep_w, out_w], deadline)
            except BaseException:
                os.close(out_r)
                raise
            finally:
                for fd in (req_r, rep_w, out_w):
                    os.close(fd)
            self._wall_deadline = time.monotonic() + limits.wall_s
            os.set_blocking(self._req, False)
            self._drain = threading.Thread(target=self._drain_output, args=(out_r,),
                                           name=f"sandbox-output-{self.pid}", daemon=True)
            self._drain.start()

            hello = self._receive(deadline, "start")
            info = hello.get("hello") if isinstance(hello, dict) else None
            if not isinstance(info, dict) or not isinstance(info.get("isolation"), dict):
                raise self._fail("protocol", "the sandbox child did not report its isolation")
            self._hello = True
            self._record_isolation(info["isolation"])
            deadline = time.monotonic() + limits.start_timeout_s
            reply = self._request({"op": "load", "code": self.code}, deadline, "start")
            if reply.get("ok") is not True:
                raise self._fail_from(reply)
            if not isinstance(reply.get("function"), str):
                raise self._fail("protocol", "the child's reply to loading has no function name")
            self.function = reply["function"]
            self._state = "running"
            return self
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Kill the child (and anything it started), remove its working directory."""
        if self._state == "closed":
            return
        self._state = "closed"
        self._kill()
        for fd in (self._req, self._rep):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._req = self._rep = None
        if self._drain is not None:
            self._drain.join(timeout=2.0)
        if self._server is not None and self.pid is not None:
            self._server.exit_status(self.pid, timeout=1.0)
            self._server.forget(self.pid)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # ---- the one request ---------------------------------------------------------------

    def call(self, ratio, advantage, clip_eps: float) -> tuple[np.ndarray, np.ndarray]:
        """``drift(ratio, advantage, clip_eps)`` and its derivative in ``ratio``.

        ``ratio`` and ``advantage``: arrays or tensors of one shape (any), sent as float32.
        Returns two float32 arrays of that shape. Raises :class:`ProposalError`.
        """
        r = _as_float32(ratio, "ratio")
        a = _as_float32(advantage, "advantage")
        if r.shape != a.shape:
            raise ValueError(f"ratio and advantage must have one shape, got {r.shape} and "
                             f"{a.shape}")
        clip_eps = float(clip_eps)
        if not math.isfinite(clip_eps):
            raise ValueError(f"clip_eps must be finite, got {clip_eps}")
        shape, n = r.shape, r.size
        with self._lock:
            self._check_running()
            if n == 0:
                return np.zeros(shape, np.float32), np.zeros(shape, np.float32)
            deadline = time.monotonic() + self.limits.call_timeout_s
            header = json.dumps({"op": "call", "n": n, "clip_eps": clip_eps}).encode()
            self._send(header + b"\n" + r.tobytes() + a.tobytes(), deadline, "call")
            reply = self._receive(deadline, "call")
            if reply.get("ok") is not True:
                raise self._fail_from(reply)
            if reply.get("n") != n:
                raise self._fail("protocol", f"the child announced {reply.get('n')!r} values "
                                             f"for a request of {n}")
            data = self._receive_exact(8 * n, deadline, "call")
        values = np.frombuffer(data, dtype="<f4", count=2 * n)
        if values.size != 2 * n:  # cannot happen after _receive_exact; kept as a guard
            raise self._fail("protocol", "the child's reply has the wrong size")
        drift = values[:n].astype(np.float32).reshape(shape)
        grad = values[n:].astype(np.float32).reshape(shape)
        return drift, grad

    # ---- internals ---------------------------------------------------------------------

    def _check_running(self):
        if self._state == "running" or self._state == "starting":
            return
        if self._error is not None:
            e = self._error
            raise ProposalError(e.reason, "the sandbox is no longer running: " + e.message,
                                e.output)
        raise RuntimeError(f"the sandbox is {self._state}; call start() first"
                           if self._state == "new" else f"the sandbox is {self._state}")

    def _record_isolation(self, reported: dict):
        iso = {str(k): v for k, v in reported.items()
               if isinstance(v, (str, int, float, bool)) and not isinstance(v, dict)}
        # Check the network namespace from this side as well.
        self._child_netns = _netns(self.pid)
        if self._child_netns is not None and self._own_netns is not None:
            if self._child_netns == self._own_netns:
                iso["network"] = "audit-hook-only"
                self._child_netns = None
        else:
            self._child_netns = None
        iso["process"] = "forked worker, own session"
        iso["environment"] = "empty (PATH, HOME, TMPDIR, LANG, OMP_NUM_THREADS only)"
        iso["workdir"] = self.workdir
        self.isolation = iso

    def _request(self, obj: dict, deadline: float, phase: str) -> dict:
        self._send(json.dumps(obj).encode() + b"\n", deadline, phase)
        return self._receive(deadline, phase)

    def _send(self, data: bytes, deadline: float, phase: str) -> None:
        view = memoryview(data)
        while view:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._timeout(phase)
            _, writable, _ = select.select([], [self._req], [], min(left, 0.25))
            if self._killed:
                raise self._death(phase)
            if writable:
                try:
                    view = view[os.write(self._req, view):]
                except BlockingIOError:
                    continue
                except (BrokenPipeError, OSError):
                    raise self._death(phase) from None

    def _read_some(self, deadline: float, phase: str) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise self._timeout(phase)
        readable, _, _ = select.select([self._rep], [], [], min(left, 0.25))
        if readable:
            chunk = os.read(self._rep, 1 << 16)
            if not chunk:
                raise self._death(phase)
            self._rbuf += chunk
        elif self._killed:
            raise self._death(phase)

    def _receive(self, deadline: float, phase: str) -> dict:
        while b"\n" not in self._rbuf:
            if len(self._rbuf) > _MAX_HEADER:
                raise self._fail("protocol", "the child sent an over-long reply line")
            self._read_some(deadline, phase)
        line, _, rest = bytes(self._rbuf).partition(b"\n")
        self._rbuf = bytearray(rest)
        if len(line) > _MAX_HEADER:
            raise self._fail("protocol", "the child sent an over-long reply line")
        try:
            msg = json.loads(line)
        except ValueError:
            msg = None
        if not isinstance(msg, dict):
            raise self._fail("protocol", "the child sent a reply that is not a JSON object "
                                         "(did the proposal write to the sandbox's channel?)")
        return msg

    def _receive_exact(self, size: int, deadline: float, phase: str) -> bytes:
        while len(self._rbuf) < size:
            self._read_some(deadline, phase)
        data = bytes(self._rbuf[:size])
        del self._rbuf[:size]
        return data

    def _drain_output(self, fd: int) -> None:
        """Keep the end of the child's output; kill it on a flood or at its wall time."""
        limit = self.limits.output_bytes
        try:
            while True:
                readable, _, _ = select.select([fd], [], [], 0.25)
                if readable:
                    chunk = os.read(fd, 1 << 16)
                    if not chunk:
                        return
                    with self._out_lock:
                        self._out_total += len(chunk)
                        self._out += chunk
                        if len(self._out) > _OUTPUT_KEEP:
                            del self._out[:-_OUTPUT_KEEP]
                    if self._out_total > limit and not self._flooded:
                        self._flooded = True
                        self._kill()
                if (not self._killed and time.monotonic() > self._wall_deadline
                        and self._state in ("starting", "running")):
                    self._wall_exceeded = True
                    self._kill()
        finally:
            os.close(fd)

    def _kill(self) -> None:
        """SIGKILL the child's process group and every process left in its network
        namespace (which catches anything that left the group)."""
        with self._kill_lock:
            self._killed = True
            pid = self.pid
            if pid is None or self._server is None:
                return
            if not self._server.exited(pid):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
            ns = self._child_netns
            if ns is None:
                return
            me = os.getpid()
            for _ in range(20):
                found = False
                for entry in os.listdir("/proc"):
                    if entry.isdigit() and int(entry) != me and _netns(entry) == ns:
                        try:
                            os.kill(int(entry), signal.SIGKILL)
                            found = True
                        except OSError:
                            pass
                if not found:
                    return
                time.sleep(0.01)

    def _fail(self, reason: str, message: str, kill: bool = True,
              with_output: bool = False) -> ProposalError:
        """A ProposalError carrying the output tail; kills the child unless ``kill`` is
        False (a failure the child survives). ``with_output`` appends the output's last
        lines to the message (for deaths, which have no traceback)."""
        output = self.output
        if with_output and output.strip():
            tail = output[-600:]
            message += "\nIts last output:\n" + tail
        error = ProposalError(reason, message, output)
        if kill:
            self._kill()
            if self._error is None:
                self._error = error
            if self._state in ("starting", "running"):
                self._state = "dead"
        return error

    def _fail_from(self, reply: dict) -> ProposalError:
        reason = reply.get("reason")
        reason = reason if isinstance(reason, str) and reason in REASONS else "runtime"
        message = reply.get("message")
        message = message if isinstance(message, str) else "(no message)"
        survivable = reason in ("runtime", "shape") and self._state == "running"
        return self._fail(reason, message, kill=not survivable)

    def _timeout(self, phase: str) -> ProposalError:
        if self._wall_exceeded or time.monotonic() >= self._wall_deadline:
            self._wall_exceeded = True
            return self._death(phase)
        if not self._hello:
            self._kill()
            return SandboxError("the sandbox child did not report its isolation in time")
        if phase == "start":
            msg = (f"the proposal did not finish loading within start_timeout_s="
                   f"{self.limits.start_timeout_s:g} s (is its top-level code a loop?); the "
                   f"sandbox was killed")
        else:
            msg = (f"the drift function did not return within call_timeout_s="
                   f"{self.limits.call_timeout_s:g} s (an endless or very slow loop?); the "
                   f"sandbox was killed")
        return self._fail("timeout", msg)

    def _death(self, phase: str) -> ProposalError:
        """The child ended (or was killed): say why."""
        self._kill()
        status = None
        if self._server is not None and self.pid is not None:
            status = self._server.exit_status(self.pid, timeout=3.0)
        if self._drain is not None:
            self._drain.join(timeout=1.0)
        limits = self.limits
        if self._flooded:
            return self._fail("output", f"output flood: the proposal wrote more than "
                                        f"output_bytes={limits.output_bytes} bytes to stdout/"
                                        f"stderr; the sandbox was killed")
        if self._wall_exceeded:
            return self._fail("timeout", f"the sandbox exceeded its wall-time limit wall_s="
                                         f"{limits.wall_s:g} s and was killed")
        where = "while loading" if phase == "start" else "during a call"
        if not self._hello:
            return SandboxError(f"the sandbox child failed before loading the proposal "
                                f"(status {status}); its output: {self.output[-1500:]}")
        if status is None:
            return self._fail("died", f"the sandbox process ended {where} (exit status "
                                      f"unknown)", with_output=True)
        raw = int(status.get("status", 0))
        cpu = float(status.get("cpu_s", 0.0))
        rss = float(status.get("maxrss_mb", 0.0))
        if os.WIFSIGNALED(raw):
            sig = os.WTERMSIG(raw)
            try:
                name = signal.Signals(sig).name
            except ValueError:
                name = f"signal {sig}"
            if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= limits.cpu_s - 0.5):
                return self._fail("cpu", f"the proposal used up its CPU time, cpu_s="
                                         f"{limits.cpu_s} s ({cpu:.1f} s used; killed by "
                                         f"{name})")
            if rss >= 0.9 * limits.memory_mb:
                return self._fail("memory", f"the sandbox died {where} with {name} at "
                                            f"{rss:.0f} MB resident, near memory_mb="
                                            f"{limits.memory_mb}")
            return self._fail("died", f"the sandbox process was killed by {name} {where} "
                                      f"(a crash in native code?)", with_output=True)
        code = os.WEXITSTATUS(raw) if os.WIFEXITED(raw) else raw
        return self._fail("died", f"the sandbox process exited {where} with status {code} "
                                  f"(did the proposal call os._exit or close the sandbox's "
                                  f"pipes?)", with_output=True)


def _as_float32(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    arr = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if arr.dtype != np.float32:
        raise TypeError(f"{name} must be numeric")
    return arr


# -- the drift member ----------------------------------------------------------------------


class _SandboxFunction(torch.autograd.Function):
    """drift from the child in forward; grad_output * (d drift / d ratio) in backward."""

    @staticmethod
    def forward(ctx, ratio, advantage, clip_eps, sandbox):
        if ctx.needs_input_grad[1]:
            raise RuntimeError("SandboxedDrift gives no gradient in the advantage; detach it")
        drift, grad = sandbox.call(ratio, advantage, clip_eps)
        out = torch.from_numpy(drift).to(device=ratio.device, dtype=ratio.dtype)
        ctx.save_for_backward(torch.from_numpy(grad).to(device=ratio.device,
                                                        dtype=ratio.dtype))
        return out

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad_output * grad, None, None, None


class SandboxedDrift(Drift):
    """A drift whose values come from a started :class:`DriftSandbox`.

    It has no parameters, so the inner loop calls it on the whole population's
    ``[P, B]`` tensors at once (one request to the child per minibatch). The gradient in
    ``ratio`` is the child's elementwise derivative; :func:`validate_drift` checks that the
    proposal is elementwise. Raises :class:`ProposalError` from a failing proposal.
    """

    name = "code"

    def __init__(self, sandbox: DriftSandbox):
        super().__init__()
        if not isinstance(sandbox, DriftSandbox):
            raise TypeError(f"SandboxedDrift needs a DriftSandbox, got {type(sandbox).__name__}")
        if not sandbox.running:
            raise ValueError("SandboxedDrift needs a started sandbox: call sandbox.start() or "
                             "use it as a context manager first")
        self.sandbox = sandbox

    def forward(self, ratio, advantage, clip_eps=0.2):
        return _SandboxFunction.apply(ratio, advantage, float(clip_eps), self.sandbox)


# -- validation ----------------------------------------------------------------------------


def validate_drift(fn, seed: int = 0) -> None:
    """Check a proposed drift before any training; raises :class:`ProposalError`.

    ``fn(ratio, advantage, clip_eps) -> (drift, grad)`` with numpy arrays, for example
    :meth:`DriftSandbox.call`. The checks, in order:

    1. random inputs of shape (10,) (ratio ~ N(1, 0.1^2) clipped above 0.01, advantage ~
       N(0, 1), clip_eps 0.2) give drift and grad of shape (10,) ("shape");
    2. no NaN or infinity there nor on the grid below ("nan");
    3. on the grid ratio in exp(linspace(-2, 2, 41)) x advantage in linspace(-8, 8, 33),
       drift >= -1e-6 ("constraint": non-negative);
    4. at ratio = 1, |drift| <= 1e-5 ("constraint": zero at r = 1) and |d drift / d ratio|
       <= 1e-4 ("constraint": flat at r = 1);
    5. each value depends only on its own ratio and advantage: the grid evaluated in two
       halves gives the same numbers ("constraint": elementwise).
    """
    rng = np.random.default_rng(seed)
    eps = 0.2
    ratio = np.clip(rng.normal(1.0, 0.1, 10), 0.0101, None).astype(np.float32)
    adv = rng.normal(0.0, 1.0, 10).astype(np.float32)
    drift, grad = _checked_call(fn, ratio, adv, eps, "random inputs")

    log_r = np.linspace(-2.0, 2.0, 41)
    log_r[20] = 0.0
    r_grid, a_grid = np.meshgrid(np.exp(log_r).astype(np.float32),
                                 np.linspace(-8.0, 8.0, 33).astype(np.float32), indexing="ij")
    r_flat, a_flat = r_grid.reshape(-1), a_grid.reshape(-1)
    drift, grad = _checked_call(fn, r_flat, a_flat, eps, "the grid")
    bad = drift < -1e-6
    if bad.any():
        i = int(np.argmin(drift))
        raise ProposalError(
            "constraint",
            f"non-negative: drift must be >= 0 everywhere, but it is negative at "
            f"{int(bad.sum())} of {drift.size} grid points (ratio in [0.14, 7.4], advantage "
            f"in [-8, 8], clip_eps 0.2); the lowest is drift({r_flat[i]:.4g}, "
            f"{a_flat[i]:.4g}) = {drift[i]:.4g}. Wrap it in relu() or square it.",
        )

    ones = np.ones(33, np.float32)
    a_line = np.linspace(-8.0, 8.0, 33).astype(np.float32)
    d1, g1 = _checked_call(fn, ones, a_line, eps, "ratio = 1")
    i = int(np.argmax(np.abs(d1)))
    if abs(d1[i]) > 1e-5:
        raise ProposalError(
            "constraint",
            f"zero at r = 1: drift must be 0 when ratio == 1, but drift(1, {a_line[i]:.4g}) "
            f"= {d1[i]:.4g}",
        )
    i = int(np.argmax(np.abs(g1)))
    if abs(g1[i]) > 1e-4:
        raise ProposalError(
            "constraint",
            f"flat at r = 1: the derivative of drift in ratio must be 0 at ratio == 1, but at "
            f"advantage {a_line[i]:.4g} it is {g1[i]:.4g}",
        )

    half = r_flat.size // 2
    d_lo, _ = _checked_call(fn, r_flat[:half], a_flat[:half], eps, "half of the grid")
    d_hi, _ = _checked_call(fn, r_flat[half:], a_flat[half:], eps, "half of the grid")
    parts = np.concatenate([d_lo, d_hi])
    tol = 1e-5 + 1e-5 * np.abs(drift)
    if (np.abs(parts - drift) > tol).any():
        i = int(np.argmax(np.abs(parts - drift) - tol))
        raise ProposalError(
            "constraint",
            f"elementwise: each drift value must depend only on its own ratio and advantage, "
            f"but drift({r_flat[i]:.4g}, {a_flat[i]:.4g}) changed from {drift[i]:.6g} to "
            f"{parts[i]:.6g} when the batch changed (no means, sums or sorting over the batch)",
        )


def _checked_call(fn, ratio, adv, eps, what):
    out = fn(ratio, adv, eps)
    if not isinstance(out, tuple) or len(out) != 2:
        raise ProposalError("shape", f"on {what}, the drift evaluation did not give "
                                     f"(drift, grad)")
    drift, grad = (np.asarray(x, dtype=np.float64) for x in out)
    for name, x in (("drift", drift), ("its derivative in ratio", grad)):
        if x.shape != ratio.shape:
            raise ProposalError("shape", f"on {what} of shape {ratio.shape}, {name} has shape "
                                         f"{x.shape}; it must have the shape of ratio")
        bad = ~np.isfinite(x)
        if bad.any():
            i = int(np.argmax(bad))
            raise ProposalError(
                "nan",
                f"{name} is NaN or infinite at {int(bad.sum())} of {x.size} points of {what}, "
                f"e.g. ratio={ratio.reshape(-1)[i]:.4g}, advantage={adv.reshape(-1)[i]:.4g} "
                f"(guard log/division/exp against small or large values)",
            )
    return drift, grad
