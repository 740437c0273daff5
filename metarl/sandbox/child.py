"""The child side of :mod:`metarl.sandbox`: a fork server and the workers it forks.

Run by the parent as ``python -I -B child.py FD`` with an empty environment, where ``FD`` is
one end of an ``AF_UNIX``/``SOCK_SEQPACKET`` socket pair. This file imports nothing from
``metarl``: the child needs torch, numpy and the standard library only.

The **fork server** is trusted code. It imports torch once, warms it up, then waits for the
parent's requests. Each request carries three pipe ends (requests in, replies out, stdout and
stderr out), optionally a fourth descriptor (the shared region: a sealed ``memfd`` of
``spec["shared_bytes"]`` bytes that neither side can resize) and the sandbox's settings; the
server forks one **worker** per request and reports the worker's pid, and later its exit
status and resource use.

A **worker** isolates itself, in this order, before any proposed code runs: its own session;
only file descriptors 0 (``/dev/null``), 1 and 2 (the output pipe), 3 (requests), 4
(replies) and, with a shared region, 5 (the region, mapped once; the mapping keeps its own
duplicate of it) left open; resource limits; ``no_new_privs``; new network and mount
namespaces (as root), or a user plus network namespace (otherwise), when the kernel allows;
private size-limited tmpfs mounts over the world-writable directories; an empty
environment; when root, uid and gid 65534 (nobody) with no supplementary groups; and last an
audit hook. It then reports what it achieved, loads the proposal and answers requests until
its request pipe closes.

Protocol (both directions): one JSON line, then, for a ``call`` that is not ``shared``, raw
float32 values (little-endian, the byte order of both ends). Parent to worker: ``{"op":
"load", "code": str, "function": name, "params": [names]}`` (the signature asked for: its
positional parameters, in order); ``{"op": "call", "n": N, "inputs": [names], "constants":
{name: number}, "grad": [names], "outputs": K, "shared": bool}``, with N float32 values per
input in the order of ``inputs``. Every parameter is one input (a float32 tensor of N
elements) or one constant (a float or int); the function is called with them positionally.
Worker to parent: ``{"hello": ...}`` once, then one reply per request: ``{"ok": true, ...}``
or ``{"ok": false, "reason": str, "message": str}``; a successful ``call`` returns the K
outputs, then d sum(outputs) / d input for each input of ``grad``, N float32 values each.
Where the values travel: with ``"shared": false``, right after the JSON line on the pipe
(request and reply alike); with ``"shared": true`` (the parent's choice, when they fit) in
the shared region, the M inputs at its start (input i at value offset i N) and the outputs
and gradients right after them (from value offset M N), nothing on the pipe but the JSON
lines. The inputs' tensors use the received memory as their storage (no copy). Nothing is
ever pickled.
"""

import os
import sys

HARNESS = os.path.abspath(__file__)
FILENAME = "<proposal>"

# Pipe ends inside a worker, and the shared region's descriptor when there is one.
REQ_FD, REP_FD, SHM_FD = 3, 4, 5

# The audit hook (audit.py) and the worker's isolation (isolation.py) live beside this
# file, loaded by path (the child runs with -I, so its directory is not on sys.path).
def _load(name):
    import importlib.util

    path = os.path.join(os.path.dirname(HARNESS), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_metarl_sandbox_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_audit = _load("audit")
Forbidden, make_hook, FORBIDDEN_MODULES = _audit.Forbidden, _audit.make_hook, \
    _audit.FORBIDDEN_MODULES
isolate = _load("isolation").isolate

# Modules imported before the worker drops its privileges: afterwards the interpreter's
# own files may not be readable (here the interpreter lives under /root).
PRELOAD = (
    "math", "cmath", "functools", "itertools", "operator", "collections", "collections.abc",
    "numbers", "statistics", "random", "fractions", "decimal", "typing", "dataclasses",
    "enum", "abc", "copy", "warnings", "re", "string", "heapq", "bisect", "traceback",
    "linecache", "json", "types", "inspect", "torch.nn.functional", "torch.special",
    "torch.distributions",
)


# -- the fork server ------------------------------------------------------------------------


def main():
    import json
    import select
    import socket

    sock = socket.socket(fileno=int(sys.argv[1]))
    import numpy as np
    import torch

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    warm_up(torch, np)
    for name in PRELOAD:
        try:
            __import__(name)
        except Exception:  # noqa: BLE001 - a missing optional module is no error
            pass
    vm_mb = status_kb("VmSize") / 1024
    sock.send(json.dumps({"hello": {"pid": os.getpid(), "vm_mb": vm_mb,
                                    "torch": torch.__version__}}).encode())
    workers = set()

    def send(data):
        try:
            sock.send(data)
        except OSError:
            pass  # the parent is gone; the next recv says so

    try:
        while True:
            ready, _, _ = select.select([sock], [], [], 0.02)
            if ready:
                try:
                    data, fds, _, _ = socket.recv_fds(sock, 1 << 20, 8)
                except OSError:
                    break
                if not data:
                    break  # the parent is gone
                request = json.loads(data)
                if request.get("op") == "fork":
                    reply = {"id": request["id"]}
                    try:
                        want = 4 if request["spec"].get("shared_bytes") else 3
                        if len(fds) != want:
                            raise ValueError(f"expected {want} file descriptors, got "
                                             f"{len(fds)}")
                        sys.stdout.flush()
                        sys.stderr.flush()
                        pid = os.fork()
                        if pid == 0:
                            sock.close()
                            worker(request["spec"], fds)  # never returns
                        workers.add(pid)
                        reply["pid"] = pid
                    except Exception as e:  # noqa: BLE001 - reported to the parent
                        reply["error"] = f"{type(e).__name__}: {e}"
                    finally:
                        for fd in fds:
                            os.close(fd)
                    send(json.dumps(reply).encode())
                elif request.get("op") == "exit":
                    break
            while workers:
                try:
                    pid, status, usage = os.wait4(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                workers.discard(pid)
                send(json.dumps({
                    "exit": pid, "status": status,
                    "cpu_s": usage.ru_utime + usage.ru_stime,
                    "maxrss_mb": usage.ru_maxrss / 1024,
                }).encode())
    finally:
        for pid in workers:
            try:
                os.killpg(pid, 9)
            except OSError:
                pass
        os._exit(0)


def warm_up(torch, np):
    """Run the kinds of elementwise operation a proposed function uses once, with autograd,
    so lazy imports and first-call set-up happen here and not in a worker without
    privileges."""
    x = torch.linspace(0.5, 2.0, 16, requires_grad=True)
    y = torch.linspace(-2.0, 2.0, 16)
    c = 0.2
    d = torch.relu((x - torch.clamp(x, 1 - c, 1 + c)) * y)
    d = d + torch.nn.functional.softplus(torch.log(x) * y) * torch.tanh(x - 1) ** 2
    d = d + torch.where(y >= 0, torch.sigmoid(x), torch.exp(-x)).abs().sqrt()
    d = d + torch.minimum(x, x.clamp(min=1.0)) * torch.maximum(x, y) + (x @ x) / 16
    d = d + torch.sign(y) * torch.square(x - 1) + torch.pow(x, 1.5) + torch.erf(x)
    (g,) = torch.autograd.grad(d.sum(), x)
    np.frombuffer(g.detach().numpy().tobytes(), dtype="<f4").copy()


def status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


# -- a worker ------------------------------------------------------------------------------


def worker(spec, fds):
    """Isolate this forked process, load the proposal and serve requests; never returns."""
    code = 70
    try:
        code = _worker(spec, fds)
    except BaseException:  # noqa: BLE001 - the last resort: say why on stderr
        try:
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
        except BaseException:  # noqa: BLE001
            pass
    finally:
        os._exit(code)


def _worker(spec, fds):
    import builtins
    import json
    import math
    import types

    import numpy as np
    import torch

    os.setsid()
    reader, send, shared = setup_fds(fds, spec.get("shared_bytes", 0))
    workdir = spec["workdir"]
    os.chdir(workdir)
    isolation = isolate(spec, workdir)
    violations = []
    sys.addaudithook(make_hook(workdir, violations))
    for name in list(sys.modules):
        if name.partition(".")[0] in FORBIDDEN_MODULES:
            del sys.modules[name]
    isolation["audit_hook"] = "installed"
    send({"hello": {"isolation": isolation, "pid": os.getpid()}})

    fn = signature = None
    while True:
        line = reader.readline()
        if not line:
            return 0
        request = json.loads(line)
        op = request.get("op")
        if op == "load":
            signature = (str(request["function"]), [str(p) for p in request["params"]])
            fn, reply = load(request["code"], signature, violations, builtins, types, torch,
                             math, np)
            flush()
            send(reply)
        elif op == "call":
            n = int(request["n"])
            names = [str(x) for x in request["inputs"]]
            need = 4 * n * (len(names) + int(request.get("outputs", 1))
                            + len(request.get("grad") or ()))
            if request.get("shared") is True:
                if shared is None or need > len(shared):
                    send({"ok": False, "reason": "protocol",
                          "message": f"a shared call of {need} bytes; the shared region "
                                     f"holds {0 if shared is None else len(shared)}"})
                    continue
                buffer = shared
            else:
                buffer = bytearray(4 * n * len(names))
                if reader.readinto(buffer) != len(buffer):
                    return 0
            if fn is None:
                send({"ok": False, "reason": "protocol", "message": "no proposal loaded"})
                continue
            reply, parts = evaluate(fn, signature[1], n, names, buffer, buffer is shared,
                                    request, violations, torch)
            flush()
            send(reply, parts)
        else:
            send({"ok": False, "reason": "protocol", "message": f"unknown op {op!r}"})


def setup_fds(fds, shared_bytes):
    """Keep only 0 (/dev/null), 1 and 2 (the output pipe), 3 (requests), 4 (replies) and,
    with a shared region (a fourth descriptor), 5. -> (reader of requests, send(obj,
    parts=()), the shared region mapped or None)."""
    import fcntl
    import json
    import mmap

    req, rep, out, *shm = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in fds)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.dup2(req, REQ_FD)
    os.dup2(rep, REP_FD)
    last = REP_FD
    if shm:
        os.dup2(shm[0], SHM_FD)
        last = SHM_FD
    os.closerange(last + 1, max(os.sysconf("SC_OPEN_MAX"), 1024))
    shared = mmap.mmap(SHM_FD, shared_bytes) if shm else None
    for name, fd in (("stdout", 1), ("stderr", 2)):
        stream = open(fd, "w", buffering=1, encoding="utf-8", errors="backslashreplace",
                      closefd=False)
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)
    reader = os.fdopen(REQ_FD, "rb", buffering=1 << 16)
    write = os.write

    def send(obj, parts=()):
        """The JSON line, then each of ``parts`` (byte memoryviews), unjoined."""
        for view in (memoryview(json.dumps(obj).encode() + b"\n"), *parts):
            while view:
                view = view[write(REP_FD, view):]

    return reader, send, shared


def flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - the proposal may have replaced or closed them
            pass


# -- loading and calling the proposal ------------------------------------------------------


def load(code, signature, violations, builtins, types, torch, math, np):
    """Compile and run the proposal's top level; find its one function, which must take the
    parameters of ``signature`` (function name, parameter names). -> (fn, reply)."""
    import linecache

    try:
        compiled = compile(code, FILENAME, "exec", dont_inherit=True)
    except SyntaxError as e:
        where = f"line {e.lineno}" + (f", column {e.offset}" if e.offset else "")
        text = (e.text or "").rstrip("\n")
        caret = ""
        if text.strip():
            indent = len(text) - len(text.lstrip())
            caret = "\n    " + text.strip()
            if e.offset:
                caret += "\n    " + " " * max(0, e.offset - 1 - indent) + "^"
        return None, error("syntax", f"{type(e).__name__} at {where}: {e.msg}{caret}")
    except (ValueError, MemoryError, RecursionError) as e:
        return None, error("syntax", f"the source does not compile: {type(e).__name__}: {e}")
    linecache.cache[FILENAME] = (len(code), None, code.splitlines(True), FILENAME)
    namespace = {"__name__": "proposal", "__builtins__": builtins, "torch": torch,
                 "math": math, "np": np, "numpy": np}
    try:
        exec(compiled, namespace)
    except BaseException as e:  # noqa: BLE001 - whatever the top level raised
        return None, failure(e, violations, "the proposal's top-level code raised an exception",
                             namespace)
    if violations:
        return None, error("forbidden", violations[0])
    functions = [(k, v) for k, v in namespace.items()
                 if isinstance(v, types.FunctionType) and v.__code__.co_filename == FILENAME]
    wanted, params = signature
    k = len(params)
    asked = f"{wanted}({', '.join(params)})"
    if len(functions) != 1:
        found = ", ".join(name for name, _ in functions) or "none"
        return None, error(
            "signature",
            f"the code must define exactly one top-level function, "
            f"{asked}; found {len(functions)} ({found}). Put any "
            f"helper inside that function.",
        )
    name, fn = functions[0]
    co = fn.__code__
    names = list(co.co_varnames[:co.co_argcount + co.co_kwonlyargcount])
    defaults = len(fn.__defaults__ or ())
    kw_defaults = len(fn.__kwdefaults__ or {})
    listed = names + (["*args"] if co.co_flags & 0x04 else []) + (
        ["**kwargs"] if co.co_flags & 0x08 else [])
    shown = f"{name}({', '.join(listed)})"
    if co.co_flags & (0x20 | 0x80 | 0x200):
        return None, error("signature", f"{shown} is a generator or coroutine; it must be a "
                                        f"plain function returning a tensor")
    ok = (co.co_argcount >= k and co.co_argcount - defaults <= k
          and not co.co_flags & (0x04 | 0x08) and kw_defaults == co.co_kwonlyargcount)
    if not ok:
        return None, error(
            "signature",
            f"the function must take exactly {count(k, 'parameter')} ({', '.join(params)}); "
            f"found {shown} with {co.co_argcount + co.co_kwonlyargcount} parameter(s)",
        )
    return fn, {"ok": True, "function": name, "params": names[:k]}


def count(k, noun):
    """``count(3, "parameter")`` -> ``"three parameters"``."""
    word = "no one two three four five six seven eight nine ten".split()[k] if k <= 10 else k
    return f"{word} {noun}{'' if k == 1 else 's'}"


def evaluate(fn, params, n, names, buffer, shared, request, violations, torch):
    """One call: the outputs and the gradients of their sum in the inputs ``request``
    names. Input i is the float32 values at value offset i n of ``buffer``, used as the
    tensor's storage. With ``shared``, the results are written into ``buffer`` after the
    inputs; otherwise they are returned as byte views to send after the reply line.
    -> (reply, byte views)."""
    constants = request.get("constants") or {}
    wanted = [str(x) for x in request.get("grad") or ()]
    k = int(request.get("outputs", 1))
    given = set(names) | set(constants)
    if (sorted(given) != sorted(params) or len(names) + len(constants) != len(params)
            or not set(wanted) <= set(names) or k < 1
            or any(type(v) not in (int, float) for v in constants.values())):
        return error("protocol", f"a call must give each of {params} once as an input or a "
                                 f"number constant and ask gradients of inputs only"), []
    like = f"{names[0]} ({n},)"
    try:
        with torch.enable_grad():
            tensors = {x: torch.frombuffer(buffer, dtype=torch.float32, count=n,
                                           offset=4 * n * i) for i, x in enumerate(names)}
            for x in wanted:
                tensors[x].requires_grad_(True)
            args = [tensors[p] if p in tensors else constants[p] for p in params]
            out = fn(*args)
            if k == 1:
                outs = [out]
                if not isinstance(out, torch.Tensor):
                    return error("shape", f"the function must return a torch tensor shaped "
                                          f"like {like}; it returned "
                                          f"{type(out).__name__}"), []
            elif (not isinstance(out, (tuple, list)) or len(out) != k
                  or not all(isinstance(o, torch.Tensor) for o in out)):
                return error("shape", f"the function must return a tuple of {k} torch "
                                      f"tensors, each shaped like {like}; it returned "
                                      f"{type(out).__name__}"), []
            else:
                outs = list(out)
            for i, o in enumerate(outs):
                if tuple(o.shape) != (n,):
                    what = "a tensor" if k == 1 else f"output {i}"
                    return error("shape", f"the function must return {what} of the same "
                                          f"shape as {names[0]}, ({n},); it returned shape "
                                          f"{tuple(o.shape)}"), []
                if o.is_complex():
                    return error("shape", "the function returned a complex tensor"), []
                if not o.is_floating_point():
                    outs[i] = o.float()
            grads = [None] * len(wanted)
            live = [o for o in outs if o.requires_grad]
            if wanted and live:
                total = live[0].sum()
                for o in live[1:]:
                    total = total + o.sum()
                grads = list(torch.autograd.grad(total, [tensors[x] for x in wanted],
                                                 allow_unused=True))
            grads = [torch.zeros_like(tensors[x]) if g is None else g
                     for x, g in zip(wanted, grads)]
        values = [t.detach().to(torch.float32).reshape(-1).contiguous() for t in outs + grads]
        if any(v.numel() != n for v in values):
            return error("shape", f"expected {n} values, got "
                                  f"{[v.numel() for v in values]}"), []
        if shared:
            out = torch.frombuffer(buffer, dtype=torch.float32, count=len(values) * n,
                                   offset=4 * n * len(names))
            for i, v in enumerate(values):
                out[i * n:(i + 1) * n] = v
            parts = []
        else:
            parts = [memoryview(v.numpy()).cast("B") for v in values]
    except BaseException as e:  # noqa: BLE001 - whatever the proposal raised
        return failure(e, violations, "the proposed function raised an exception"), []
    if violations:
        return error("forbidden", violations[0]), []
    return {"ok": True, "n": n}, parts


def error(reason, message, limit=6000):
    """An error reply; a long message keeps its first line and its end."""
    if len(message) > limit:
        head = message.split("\n", 1)[0][:limit // 4]
        message = head + "\n[...]\n" + message[-(limit - len(head) - 7):]
    return {"ok": False, "reason": reason, "message": message}


# Freed before an error is formatted, so that a proposal that ran out of memory still gets
# its traceback reported.
_reserve = [bytearray(1 << 20)]


def failure(e, violations, summary, namespace=None):
    _reserve.clear()
    try:
        import traceback

        traceback.clear_frames(e.__traceback__)  # drop the proposal's locals (memory)
        if namespace is not None:
            namespace.clear()
        if violations:
            reason, summary = "forbidden", violations[0]
        elif isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and any(
                s in str(e) for s in ("can't allocate memory", "not enough memory",
                                      "DefaultCPUAllocator"))):
            reason = "memory"
            summary = "the proposal ran out of memory (the memory_mb limit)"
        elif isinstance(e, SystemExit):
            reason, summary = "runtime", "the proposal called exit()"
        else:
            reason = "runtime"
        return error(reason, summary + "\n" + format_tail(e))
    except BaseException:  # noqa: BLE001 - a hostile exception object, or no memory left
        return error("forbidden" if violations else "runtime",
                     violations[0] if violations else summary)
    finally:
        if not _reserve:
            try:
                _reserve.append(bytearray(1 << 20))
            except MemoryError:
                pass


def format_tail(e):
    """The traceback without the harness's own frames."""
    import traceback

    try:
        te = traceback.TracebackException.from_exception(e, limit=-30)
        te.stack = traceback.StackSummary.from_list(
            [f for f in te.stack if os.path.abspath(f.filename) != HARNESS])
        return "".join(te.format())
    except BaseException:  # noqa: BLE001 - fall back to the bare exception
        return f"{type(e).__name__}: {e}"


if __name__ == "__main__":
    main()
