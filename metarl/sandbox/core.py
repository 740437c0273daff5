"""One sandbox: untrusted source code of one function, loaded in an isolated child process.

See :mod:`metarl.sandbox` for the API and docs/sandbox.md for what the isolation does and
what it does not protect against.

How a child is made: a fork server (``child.py``, started once per parent process with an
empty environment) imports torch once; each :meth:`Sandbox.start` has it fork a worker,
which isolates itself (session, resource limits, network and mount namespaces, uid nobody,
audit hook) before it reads the proposal. Requests carry named float32 inputs and number
constants; replies come back as a JSON line plus raw float32 values; nothing the child sends
is ever unpickled.

The transport (see ``child.py`` for the messages): requests and replies are JSON lines on
two pipes (enlarged to 1 MiB where the kernel allows). The float32 values of a call travel
through a **shared region** when they fit: a ``memfd`` of ``_SHARED_BYTES`` bytes, created
here, sealed against shrinking and growing (``F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL``,
so no access of the parent's mapping can fault), handed to the worker at its fork and mapped
by both. The parent writes the inputs at its start, the worker computes on them in place and
writes the outputs and gradients right after them, then replies with a JSON line; the parent
copies the outputs out once and only then checks and returns them, so a proposal that writes
to the region at any other time can only change its own inputs or outputs. A call that does
not fit (or a system without sealed memfds) sends the values over the pipes instead, written
from the arrays' own memory and read into one preallocated array.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import select
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict

import numpy as np

from metarl.sandbox.base import REASONS, ProposalError, SandboxError, SandboxLimits
from metarl.sandbox.forkserver import NOBODY, _fork_server, _ForkServer, _netns
from metarl.sandbox.transport import CallResult, _as_float32, _grow_pipe, _shared_region

__all__ = ["CallResult", "Sandbox"]

_OUTPUT_KEEP = 4096  # bytes of the child's output kept (the last ones)
_FILE_BYTES = 64 << 20  # RLIMIT_FSIZE
_MAX_CODE_CHARS = 200_000
_MAX_HEADER = 1 << 16  # the longest JSON line accepted from a child
_HEADROOM_MB = 256  # memory_mb must exceed the child's footprint after importing torch by this
_SHARED_BYTES = 64 << 20  # the shared region: inputs, outputs and gradients of a call that fit
_PIPE_BYTES = 1 << 20  # the request and reply pipes' buffers, where the kernel allows


class Sandbox:
    """One proposed function, loaded in one isolated child process.

    ``code`` is the proposal's source; it must define exactly one top-level function that
    takes the positional parameters ``params`` (the names the family's signature gives
    them; the proposal may name them differently). ``function`` is the name the signature
    asks for, used in messages. Use as a context manager (or call :meth:`start` and
    :meth:`close`)::

        with Sandbox(code, "f", ("x", "y", "scale")) as sandbox:
            res = sandbox.call({"x": x, "y": y}, {"scale": 0.5}, grad=("x",))
            value, dvalue_dx = res.output, res.grads["x"]

    :meth:`start` raises :class:`ProposalError` if the code does not load (syntax, not
    exactly one function of that many parameters, top-level code that raises, loops, or
    does something forbidden). After a start, ``isolation`` says what isolation the child
    got (e.g. ``{"network": "namespace", "user": "nobody", ...}``) and ``function`` the name
    of the proposal's function.

    A call that raises inside the proposal or returns the wrong shape leaves the child
    running; anything else (timeout, death, output flood, forbidden action, broken
    protocol) kills it, and later calls raise the same :class:`ProposalError`.
    """

    def __init__(self, code: str, function: str, params: Sequence[str],
                 limits: SandboxLimits | None = None):
        if not isinstance(code, str):
            raise TypeError(f"code must be a str of Python source, got {type(code).__name__}")
        if not isinstance(function, str) or not function.isidentifier():
            raise ValueError(f"function must be a function name, got {function!r}")
        if isinstance(params, str) or not all(
                isinstance(p, str) and p.isidentifier() for p in params):
            raise ValueError(f"params must be a sequence of parameter names, got {params!r}")
        params = tuple(params)
        if not params or len(set(params)) != len(params):
            raise ValueError(f"params must name at least one parameter, each once: {params}")
        if limits is None:
            limits = SandboxLimits()
        if not isinstance(limits, SandboxLimits):
            raise TypeError(f"limits must be a SandboxLimits, got {type(limits).__name__}")
        self.code, self.limits = code, limits
        self.signature = f"{function}({', '.join(params)})"
        self.params = params
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
        self._shm: mmap.mmap | None = None  # the shared region (None: pipes only)
        self._shared: np.ndarray | None = None  # the region as float32 values
        self._out = bytearray()
        self._out_total = 0
        self._out_lock = threading.Lock()
        self._drain: threading.Thread | None = None
        self._flooded = self._wall_exceeded = self._killed = self._hello = False
        self._wall_deadline = math.inf
        self._own_netns = _netns("self")
        self._child_netns: str | None = None

    # ---- life cycle --------------------------------------------------------------------

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __repr__(self):
        return f"Sandbox(state={self._state!r}, pid={self.pid}, function={self.function!r})"

    @property
    def running(self) -> bool:
        return self._state == "running"

    @property
    def output(self) -> str:
        """The end of what the child wrote to stdout and stderr (at most a few KB)."""
        with self._out_lock:
            return bytes(self._out).decode("utf-8", errors="replace")

    def start(self) -> Sandbox:
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
            # the footprint, the shared region (mapped before RLIMIT_AS is set) and headroom
            need = math.ceil(server.footprint_mb) + (_SHARED_BYTES >> 20) + _HEADROOM_MB
            if limits.memory_mb < need:
                raise ValueError(
                    f"SandboxLimits.memory_mb={limits.memory_mb} is too small: the child maps "
                    f"{server.footprint_mb:.0f} MB once torch is imported and "
                    f"{_SHARED_BYTES >> 20} MB of shared memory for the call's values; use at "
                    f"least {need}")
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
            for fd in (self._req, self._rep):
                _grow_pipe(fd, _PIPE_BYTES)
            fds = [req_r, rep_w, out_w]
            shm_fd = _shared_region(_SHARED_BYTES) if _SHARED_BYTES > 0 else None
            if shm_fd is not None:
                try:
                    self._shm = mmap.mmap(shm_fd, _SHARED_BYTES)
                except OSError:  # no room to map it here: the values go over the pipes
                    os.close(shm_fd)
                else:
                    self._shared = np.frombuffer(self._shm, dtype=np.float32)
                    fds.append(shm_fd)
            spec = {"workdir": self.workdir, "limits": asdict(limits),
                    "file_bytes": _FILE_BYTES, "uid": NOBODY if root else None,
                    "gid": NOBODY if root else None,
                    "shared_bytes": _SHARED_BYTES if self._shm is not None else 0}
            try:
                self.pid = server.fork(spec, fds, deadline)
            except BaseException:
                os.close(out_r)
                raise
            finally:
                for fd in fds:
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
            function = self.signature.partition("(")[0]
            reply = self._request({"op": "load", "code": self.code, "function": function,
                                   "params": list(self.params)}, deadline, "start")
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
        self._shared = None
        if self._shm is not None:
            try:
                self._shm.close()
            except BufferError:  # a view still exists somewhere; unmapped when collected
                pass
            self._shm = None
        if self._drain is not None:
            self._drain.join(timeout=2.0)
        if self._server is not None and self.pid is not None:
            self._server.exit_status(self.pid, timeout=1.0)
            self._server.forget(self.pid)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # ---- the one request ---------------------------------------------------------------

    def call(self, inputs: Mapping[str, object],
             constants: Mapping[str, float | int] | None = None, grad: Sequence[str] = (),
             outputs: int = 1) -> CallResult:
        """Call the proposed function once.

        ``inputs``: parameter name -> array or tensor, all of one shape (any), sent as
        float32; the function sees each as a flat float32 tensor of that many elements.
        ``constants``: parameter name -> a finite float or an int. Together they give every
        parameter of the signature exactly once; the function is called with them
        positionally, in the signature's order. ``grad``: the inputs to differentiate
        ``sum(outputs)`` in (torch autograd, in the child). ``outputs``: how many tensors
        the function returns (one, or a tuple of that many), each with one value per
        element. Returns float32 arrays of the inputs' shape. Raises
        :class:`ProposalError`.
        """
        constants = dict(constants or {})
        grad = tuple(grad)
        names = list(inputs)
        given = names + list(constants)
        if sorted(given) != sorted(self.params):
            raise ValueError(f"a call of {self.signature} gives each parameter once, as an "
                             f"input or a constant; got inputs {names} and constants "
                             f"{list(constants)}")
        if not names:
            raise ValueError("a call needs at least one input tensor")
        if not set(grad) <= set(names) or len(set(grad)) != len(grad):
            raise ValueError(f"grad {list(grad)} must name inputs ({names}), each once")
        if isinstance(outputs, bool) or not isinstance(outputs, int) or outputs < 1:
            raise ValueError(f"outputs must be a positive int, got {outputs!r}")
        for k, v in constants.items():
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise TypeError(f"constant {k} must be a float or an int, got {v!r}")
            constants[k] = int(v) if isinstance(v, (int, np.integer)) else float(v)
            if not math.isfinite(constants[k]):
                raise ValueError(f"{k} must be finite, got {v}")
        arrays = [_as_float32(inputs[x], x) for x in names]
        shape, n = arrays[0].shape, arrays[0].size
        for x, a in zip(names, arrays):
            if a.shape != shape:
                raise ValueError(f"the inputs must have one shape, got {shape} for "
                                 f"{names[0]} and {a.shape} for {x}")
        k = outputs + len(grad)
        m = len(arrays)
        with self._lock:
            self._check_running()
            if n == 0:
                values = [np.zeros(shape, np.float32) for _ in range(k)]
            else:
                deadline = time.monotonic() + self.limits.call_timeout_s
                region = self._shared  # a local reference: close() cannot unmap it now
                shared = region is not None and (m + k) * n <= region.size
                header = json.dumps({"op": "call", "n": n, "inputs": names,
                                     "constants": constants, "grad": list(grad),
                                     "outputs": outputs, "shared": shared}).encode() + b"\n"
                if shared:
                    for i, a in enumerate(arrays):
                        region[i * n:(i + 1) * n] = a.reshape(-1)
                    self._send([header], deadline, "call")
                else:
                    self._send([header] + [memoryview(a).cast("B") for a in arrays],
                               deadline, "call")
                reply = self._receive(deadline, "call")
                if reply.get("ok") is not True:
                    raise self._fail_from(reply)
                if reply.get("n") != n:
                    raise self._fail("protocol", f"the child announced {reply.get('n')!r} "
                                                 f"values for a request of {n}")
                if shared:  # one copy out: the child cannot change it afterwards
                    if self._rbuf:
                        raise self._fail("protocol", "the child sent bytes after its reply "
                                                     "to a shared call")
                    flat = region[m * n:(m + k) * n].copy()
                else:
                    flat = np.empty(k * n, np.float32)
                    self._receive_into(memoryview(flat).cast("B"), deadline, "call")
                values = [flat[i * n:(i + 1) * n].reshape(shape) for i in range(k)]
        return CallResult(tuple(values[:outputs]), dict(zip(grad, values[outputs:])))

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
        self._send([json.dumps(obj).encode() + b"\n"], deadline, phase)
        return self._receive(deadline, phase)

    def _send(self, parts: list, deadline: float, phase: str) -> None:
        """Write ``parts`` (bytes or byte memoryviews) in order, without joining them."""
        views = [memoryview(p) for p in parts if len(p)]
        while views:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._timeout(phase)
            _, writable, _ = select.select([], [self._req], [], min(left, 0.25))
            if self._killed:
                raise self._death(phase)
            if writable:
                try:
                    done = os.writev(self._req, views[:64])
                except BlockingIOError:
                    continue
                except (BrokenPipeError, OSError):
                    raise self._death(phase) from None
                while views and done >= len(views[0]):
                    done -= len(views.pop(0))
                if done:
                    views[0] = views[0][done:]

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

    def _receive_into(self, target: memoryview, deadline: float, phase: str) -> None:
        """Fill ``target`` with exactly its size in bytes from the reply pipe: first what
        is left over after the reply line, then straight from the pipe."""
        got = min(len(self._rbuf), len(target))
        target[:got] = self._rbuf[:got]
        del self._rbuf[:got]
        while got < len(target):
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._timeout(phase)
            readable, _, _ = select.select([self._rep], [], [], min(left, 0.25))
            if readable:
                size = os.readv(self._rep, [target[got:]])
                if not size:
                    raise self._death(phase)
                got += size
            elif self._killed:
                raise self._death(phase)

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
            msg = (f"the proposed function did not return within call_timeout_s="
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
