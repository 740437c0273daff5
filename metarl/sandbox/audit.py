"""The audit hook of a sandbox worker (see ``child.py``, which loads this file by path: like
it, this file imports nothing from ``metarl``).

The hook is the Python-level layer of the sandbox; the operating-system layer (uid, network
and mount namespaces, resource limits) is the boundary that holds when it is bypassed.
"""

# Imported by a worker only through an audit-hook violation (and dropped from sys.modules).
FORBIDDEN_MODULES = frozenset({
    "ctypes", "_ctypes", "socket", "_socket", "ssl", "_ssl",
    "subprocess", "_posixsubprocess", "multiprocessing", "_multiprocessing", "signal",
    "_signal", "pty", "resource",
})

# -- the audit hook ------------------------------------------------------------------------


class Forbidden(RuntimeError):
    """Raised by the audit hook; the message starts with ``forbidden:``."""


_PROCESS_EVENTS = ("os.fork", "os.forkpty", "os.exec", "os.spawn", "os.posix_spawn",
                   "os.system", "os.startfile", "subprocess.", "pty.")
_DENIED_EVENTS = frozenset({
    "os.killpg", "resource.setrlimit", "resource.prlimit", "sys.addaudithook",
    "gc.get_objects", "gc.get_referrers", "gc.get_referents",
})
# Events whose listed arguments are paths that must lie inside the working directory, and
# the index of their dir_fd argument (or None).
_PATH_EVENTS = {
    "os.remove": ((0,), 1), "os.rmdir": ((0,), 1), "os.mkdir": ((0,), 2),
    "os.rename": ((0, 1), 2), "os.link": ((0, 1), 2), "os.symlink": ((1,), 2),
    "os.chmod": ((0,), 2), "os.chown": ((0,), 3), "os.utime": ((0,), 3),
    "os.truncate": ((0,), None), "os.chflags": ((0,), None), "os.lchflags": ((0,), None),
    "os.setxattr": ((0,), None), "os.removexattr": ((0,), None), "os.mkfifo": ((0,), 2),
    "os.mknod": ((0,), 3), "shutil.rmtree": ((0,), 1), "shutil.copyfile": ((1,), None),
    "shutil.copymode": ((1,), None), "shutil.copystat": ((1,), None),
    "shutil.copytree": ((1,), None), "shutil.move": ((1,), None),
}


def make_hook(workdir, violations):
    """The worker's audit hook. The first violation is appended to ``violations`` (so it is
    reported even if the proposal catches the exception).

    Everything the hook uses is bound here, before any proposed code runs, and kept in the
    closure: patching ``os``, ``os.path`` or ``builtins`` later does not change what it
    checks. (This makes it harder to subvert, not impossible: see docs/sandbox.md.)
    """
    import posix
    import stat

    lstat, readlink, getcwd, getpid = posix.lstat, posix.readlink, posix.getcwd, posix.getpid
    s_islnk = stat.S_ISLNK
    _isinstance, _type, _str, _bytes, _int, _len, _repr, _OSError, _Exception = (
        isinstance, type, str, bytes, int, len, repr, OSError, Exception)
    join = "".join
    _Forbidden = Forbidden
    forbidden_modules, process_events = FORBIDDEN_MODULES, _PROCESS_EVENTS
    denied_events, path_events = _DENIED_EVENTS, _PATH_EVENTS
    write_flags = posix.O_WRONLY | posix.O_RDWR | posix.O_CREAT | posix.O_TRUNC | posix.O_APPEND
    own_pid = getpid()
    own = _str(own_pid)
    devnull = "/dev/null"

    def deny(what):
        message = "forbidden: " + what
        if not violations:
            violations.append(message)
        raise _Forbidden(message)

    def name_of(path):
        """A plain str for a str or bytes path; anything else (a PathLike that could answer
        differently each time it is asked) is refused."""
        if _isinstance(path, _str):
            return join((path,))  # an exact str even for a str subclass
        if _isinstance(path, _bytes):
            return _bytes.decode(path, "utf-8", "surrogateescape")
        deny("only str or bytes paths are accepted in the sandbox")

    def resolve(name):
        """An absolute path with symbolic links resolved where they can be read."""
        if not name.startswith("/"):
            name = getcwd() + "/" + name
        todo = name.split("/")
        todo.reverse()
        done, links = "", 0
        while todo:
            part = todo.pop()
            if part in ("", "."):
                continue
            if part == "..":
                done = done.rpartition("/")[0]
                continue
            candidate = done + "/" + part
            try:
                is_link = s_islnk(lstat(candidate).st_mode)
            except _OSError:
                is_link = False
            if not is_link:
                done = candidate
                continue
            links += 1
            if links > 40:
                deny("too many levels of symbolic links in " + name)
            try:
                target = readlink(candidate)
            except _OSError:
                done = candidate
                continue
            if target.startswith("/"):
                done = ""
            parts = target.split("/")
            parts.reverse()
            todo.extend(parts)
        return done or "/"

    def inside(real):
        return real == workdir or real.startswith(workdir + "/")

    def check_proc(real, name):
        parts = real.split("/")
        if _len(parts) > 2 and parts[1] == "proc" and parts[2].isdigit() and parts[2] != own:
            deny("accessing " + _repr(name) + " (another process's /proc entry)")

    def check_open(args):
        path, mode, flags = (args + (None, None, None))[:3]
        if path is None or _type(path) is _int:
            return  # an already open descriptor
        m = join((mode,)) if _isinstance(mode, _str) else ""
        writing = (_isinstance(flags, _int) and flags & write_flags) or (
            "w" in m or "a" in m or "x" in m or "+" in m)
        name = name_of(path)
        if writing and mode is None and not name.startswith("/"):
            # os.open(): it may be relative to a dir_fd that this hook cannot see.
            deny("os.open of the relative path " + _repr(name) + " for writing; use open()")
        real = resolve(name)
        check_proc(real, name)
        if writing and not inside(real) and real != devnull:
            deny("writing " + _repr(name) + ": only the working directory is writable")

    def hook(event, args):
        if event == "import":
            module = join((args[0],)) if _isinstance(args[0], _str) else ""
            if module.partition(".")[0] in forbidden_modules:
                deny("importing " + _repr(module) + " is not allowed in the sandbox")
        elif event == "open":
            check_open(args)
        elif event.startswith("socket."):
            deny("network access (" + event + ") is not allowed in the sandbox")
        elif event.startswith("ctypes."):
            deny("ctypes (" + event + ") is not allowed in the sandbox")
        elif event.startswith(process_events):
            deny("starting processes (" + event + ") is not allowed in the sandbox")
        elif event == "os.kill":
            if args[0] != own_pid:
                deny("sending signals to other processes (os.kill of pid "
                     + _str(args[0]) + ")")
        elif event in denied_events:
            deny(event + " is not allowed in the sandbox")
        elif event in ("os.chdir", "os.listdir", "os.scandir"):
            path = args[0] if args else None
            if _type(path) is _int:
                if event == "os.chdir":
                    deny("os.fchdir is not allowed in the sandbox")
            elif path is not None:
                name = name_of(path)
                real = resolve(name)
                check_proc(real, name)
                if event == "os.chdir" and not inside(real):
                    deny("changing directory to " + _repr(name)
                         + " (outside the working directory)")
        elif event in path_events:
            positions, dir_fd = path_events[event]
            relative_to_fd = (dir_fd is not None and _len(args) > dir_fd
                              and args[dir_fd] not in (None, -1))
            for i in positions:
                if i >= _len(args) or _type(args[i]) is _int:
                    continue
                name = name_of(args[i])
                if relative_to_fd and not name.startswith("/"):
                    deny(event + " relative to a directory descriptor")
                if not inside(resolve(name)):
                    deny(event + " on " + _repr(name)
                         + ": only the working directory may be modified")

    def guarded(event, args):
        try:
            hook(event, args)
        except _Forbidden:
            raise
        except _Exception as e:  # a check that cannot be made is a refusal
            deny(event + " could not be checked (" + _type(e).__name__ + ")")

    workdir = resolve(workdir)
    return guarded
