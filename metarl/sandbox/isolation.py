"""The isolation of a sandbox worker (see ``child.py``, which loads this file by path: like
the child, it imports nothing from ``metarl``, only the standard library).

:func:`isolate` runs in the forked worker before any proposed code: resource limits,
``no_new_privs``, new network and mount namespaces (as root; a user plus network namespace
otherwise) when the kernel allows, private size-limited tmpfs mounts over the
world-writable directories, an empty environment, and, as root, uid and gid 65534
(nobody). It returns what it achieved, which the worker reports to the parent.
"""

import os
import sys

NOBODY = 65534

# Linux constants (x86-64 and arm64 share them).
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 4096, 16384, 1 << 18
PR_SET_NO_NEW_PRIVS = 38

# Directories anyone may write to; a worker with a mount namespace gets private ones.
SHARED_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
TMPFS_OPTIONS = b"size=16m,nr_inodes=4096,mode=1777"


def isolate(spec, workdir):
    """Resource limits, no_new_privs, namespaces, private tmp, empty environment, uid drop.
    Returns what was achieved."""
    import ctypes
    import resource

    isolation = {}
    limits = spec["limits"]
    cpu = int(limits["cpu_s"])
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_mb"] << 20,) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits["open_files"],) * 2)
    resource.setrlimit(resource.RLIMIT_NPROC, (limits["nproc"],) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (spec["file_bytes"],) * 2)
    isolation["rlimits"] = "cpu, address space, processes, open files, file size, core"

    libc = ctypes.CDLL(None, use_errno=True)

    def call(name, *args):
        if getattr(libc, name)(*args) != 0:
            err = ctypes.get_errno()
            return f"{name}: {os.strerror(err)} (errno {err})"
        return None

    isolation["no_new_privs"] = call("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) is None
    root = os.geteuid() == 0
    mount_ns = False
    errors = []
    if root:
        err = call("unshare", CLONE_NEWNS | CLONE_NEWNET)
        if err is None:
            isolation["network"], mount_ns = "namespace", True
        else:
            errors.append(err)
            err = call("unshare", CLONE_NEWNET)
            if err is None:
                isolation["network"] = "namespace"
            else:
                errors.append(err)
    if "network" not in isolation:
        err = call("unshare", CLONE_NEWUSER | CLONE_NEWNET)
        if err is None:
            isolation["network"] = "user-namespace"
        else:
            errors.append(err)
            isolation["network"] = "audit-hook-only"
    isolation["tmp"] = "shared"
    if mount_ns:
        # Private first, so that nothing mounted here propagates to the host.
        err = call("mount", None, b"/", None, MS_REC | MS_PRIVATE, None)
        if err is None:
            covered = private_tmp(call, workdir)
            if covered:
                isolation["tmp"] = "private tmpfs on " + ", ".join(covered)
        else:
            errors.append(err)
    if errors:
        isolation["errors"] = "; ".join(errors)

    os.environ.clear()
    os.environ.update({"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
                       "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"})
    if "tempfile" in sys.modules:
        sys.modules["tempfile"].tempdir = workdir

    if root and spec.get("uid") is not None:
        os.setgroups([])
        os.setgid(spec["gid"])
        os.setuid(spec["uid"])
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            raise RuntimeError("the worker could regain uid 0 after dropping it")
    isolation["uid"] = os.getuid()
    isolation["user"] = "nobody" if os.getuid() == NOBODY else "same-user"
    return isolation


def private_tmp(call, workdir):
    """Mount small private tmpfs file systems over the shared writable directories, keeping
    the working directory visible at its own path. Returns the directories covered."""
    here = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
    covered = []
    try:
        for d in SHARED_WRITABLE:
            if os.path.isdir(d) and os.path.realpath(d) == d:
                if call("mount", b"tmpfs", d.encode(), b"tmpfs", MS_NOSUID | MS_NODEV,
                        TMPFS_OPTIONS) is None:
                    covered.append(d)
        st = os.fstat(here)
        try:
            now = os.stat(workdir)
            same = (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)
        except OSError:
            same = False
        if not same:
            os.makedirs(workdir, exist_ok=True)
            err = call("mount", f"/proc/self/fd/{here}".encode(), workdir.encode(), None,
                       MS_BIND, None)
            if err is not None:
                raise RuntimeError(f"could not keep the working directory visible: {err}")
        os.chdir(workdir)
    finally:
        os.close(here)
    return covered
