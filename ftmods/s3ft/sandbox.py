r"""Run untrusted Python (model-generated code) in a separate, resource-limited process.

:func:`run_python` never executes the code in the calling process. It writes the code to a fresh temporary folder,
starts ``sys.executable -I -S -B _boot.py`` there and waits for it with a wall-clock timeout. ``-I`` (isolated mode)
ignores ``PYTHON*`` variables and leaves the script folder and user site off ``sys.path``. ``-S`` skips ``site``, so
no installed packages are importable, only the standard library. ``-B`` writes no bytecode.

**What is enforced** (Linux):

- *Separate process in its own session and process group* (``start_new_session=True``). When the main process
  exits, or at the timeout, the whole group gets ``SIGKILL`` (the group is killed before the main process is reaped,
  so its id cannot have been reused). Then ``/proc`` is swept for any process whose environment carries this run's
  random token (``FTMODS_SANDBOX_TOKEN``), which catches descendants that left the group with ``setsid``.
- *Resource limits*, set by the boot script before the user code runs, soft = hard:
  - ``RLIMIT_AS`` = ``memory_mb`` (allocations beyond it raise ``MemoryError``);
  - ``RLIMIT_CPU`` = ``cpu_s`` or ``ceil(timeout_s) + 1`` seconds (``SIGXCPU``, then ``SIGKILL`` one second later);
  - ``RLIMIT_NPROC`` = 32, ``RLIMIT_NOFILE`` = 64, ``RLIMIT_FSIZE`` = 10 MiB (also caps stdout / stderr, which go to
    files), ``RLIMIT_CORE`` = 0.
  The limits are set in the child rather than in a ``preexec_fn``, which CPython documents as unsafe when the parent
  has threads (:class:`~ftmods.s3ft.judges.UnitTestJudge` runs sandboxes from a thread pool). No user code runs
  before they are in place.
- *Minimal environment*: only ``PATH=/usr/bin:/bin``, ``LANG``/``LC_ALL=C.UTF-8``, ``HOME`` and ``TMPDIR`` pointing at
  the sandbox folder, ``PYTHONDONTWRITEBYTECODE=1`` and the token. No proxies, credentials or other variables of the
  caller. ``stdin`` is ``/dev/null``.
- *Working directory* = the temporary folder, deleted afterwards.
- *A prelude* (installed by the boot script, then the code runs as ``__main__`` from ``main.py``) that makes these
  raise ``PermissionError``:
  - process creation and escape: ``os.fork``, ``forkpty``, ``system``, ``popen``, ``exec*``, ``spawn*``,
    ``posix_spawn*``, ``setsid``, ``setpgid``, ``setpgrp``, ``os.kill`` of other processes, ``killpg``,
    ``subprocess.Popen``, ``_posixsubprocess.fork_exec``;
  - imports of ``multiprocessing`` and ``ctypes``;
  - network: ``socket.socket`` and name resolution (``getaddrinfo`` and friends);
  - ``resource.setrlimit`` / ``prlimit``;
  - writing, creating, renaming or deleting outside the sandbox folder through ``open``, ``io.open``, ``os.open``,
    ``io.FileIO``, ``pathlib``, ``os.remove`` / ``unlink`` / ``rmdir`` / ``mkdir`` / ``rename`` / ``replace`` /
    ``link`` / ``symlink`` / ``chmod`` / ``chown`` / ``truncate`` / ``utime`` and ``shutil.rmtree`` (paths are
    resolved with ``realpath``, ``dir_fd`` through ``/proc/self/fd``); ``/dev/null`` stays writable;
  - reading files outside the sandbox folder, the Python installation, ``/dev``, ``/usr/share/zoneinfo`` and the
    process's own ``/proc/<pid>`` (so no ``/proc/<parent>/environ``, no ``~/.netrc``).

**What is not guaranteed.** There is no seccomp filter, no namespaces, no chroot and no change of user. The prelude
is in-process Python: code that wants out can undo it (re-import a popped extension module, reach ``ctypes``, read
the originals from closures). What then still holds are the rlimits, the process-group kill and the token sweep,
with these gaps:

- run as **root** (as in many containers), ``RLIMIT_NPROC`` is not enforced and the code may raise its own hard
  limits; a fork bomb that gets past the prelude is stopped only by the timeout's group kill;
- once past the prelude, the code can read and write anything its user can (``/proc/<parent>/environ``, and as root
  every file) and can reach the network;
- a descendant that leaves the process group *and* replaces its environment (``execve`` with a new one) survives the
  run (its CPU and memory limits still apply).

So: this is a seat belt against the accidents of model-written code (infinite loops, runaway memory, stray
``os.remove``, a test that shells out), not a security boundary. For untrusted code at scale, run the whole builder
in a disposable container or VM without network or secrets (or a dedicated sandbox such as nsjail / gVisor).

Windows is not supported (no ``resource``, process groups or ``/proc``); macOS runs with weaker limits and no sweep.

Example:
    >>> result = run_python("print(sum(range(10)))", timeout_s=10)
    >>> result.ok, result.stdout
    (True, '45\n')
    >>> run_python("import os; os.fork()", timeout_s=10).stderr.splitlines()[-1]
    'PermissionError: sandbox: os.fork is not allowed'
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

try:
    import resource
except ImportError:  # Windows
    resource = None  # type: ignore[assignment]

__all__ = ["MAX_FILE_BYTES", "MAX_OPEN_FILES", "MAX_PROCESSES", "TOKEN_VARIABLE", "SandboxResult", "run_python"]

MAX_FILE_BYTES = 10 * 2**20
"""``RLIMIT_FSIZE``: the largest file (and stdout / stderr) the code may write, in bytes."""
MAX_OPEN_FILES = 64
"""``RLIMIT_NOFILE``: open file descriptors."""
MAX_PROCESSES = 32
"""``RLIMIT_NPROC``: processes and threads of the user (not enforced for root)."""
TOKEN_VARIABLE = "FTMODS_SANDBOX_TOKEN"
"""Environment variable carrying each run's random token; descendants that still carry it are killed at the end."""


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one :func:`run_python` call."""

    ok: bool
    """The code finished within the timeout with exit status 0."""
    returncode: int | None
    """Exit status; negative for death by a signal (e.g. ``-SIGXCPU``, ``-SIGKILL``); ``None`` after a timeout."""
    stdout: str
    """Captured standard output (UTF-8, invalid bytes replaced), shortened to ``max_output`` characters."""
    stderr: str
    """Captured standard error (tracebacks end up here), shortened the same way."""
    timed_out: bool
    """The wall-clock timeout expired and the sandbox killed the process group."""
    killed: bool
    """The process died from a signal: the sandbox's timeout kill or a limit (CPU, file size, ...)."""
    seconds: float
    """Wall-clock time from start to the end of the clean-up."""


def run_python(
    code: str,
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    cpu_s: int | None = None,
    max_output: int = 10_000,
) -> SandboxResult:
    """Run ``code`` as ``__main__`` in a fresh, limited Python process (see the module docstring for the limits).

    Args:
        code: Python source; it runs in a temporary working folder that is deleted afterwards.
        timeout_s: Wall-clock limit in seconds; at expiry the whole process group is killed.
        memory_mb: Address-space limit (``RLIMIT_AS``) in MiB.
        cpu_s: CPU-time limit in seconds; ``None`` means ``ceil(timeout_s) + 1``.
        max_output: Characters kept of stdout and of stderr each; longer output keeps its first and last halves
            around a ``[... N characters cut ...]`` line (a result or traceback at the end survives).

    Returns:
        The exit status, captured output and what happened (timeout, killed), see :class:`SandboxResult`.

    Raises:
        RuntimeError: On a platform without ``resource`` or process groups (Windows).
        ValueError: If a limit is not positive.
    """
    if resource is None or os.name != "posix":
        raise RuntimeError("ftmods.s3ft.sandbox needs a POSIX system (Linux); Windows is not supported")
    if timeout_s <= 0 or memory_mb <= 0 or max_output <= 0 or (cpu_s is not None and cpu_s <= 0):
        raise ValueError("timeout_s, memory_mb, cpu_s and max_output must be positive")
    token = secrets.token_hex(16)
    cpu = cpu_s if cpu_s is not None else math.ceil(timeout_s) + 1
    with (
        tempfile.TemporaryDirectory(prefix="ftmods-sandbox-", ignore_cleanup_errors=True) as folder,
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
    ):
        root = os.path.realpath(folder)
        Path(root, "main.py").write_text(code, encoding="utf-8")
        limits = {"as": memory_mb * 2**20, "cpu": cpu, "nproc": MAX_PROCESSES, "nofile": MAX_OPEN_FILES}
        Path(root, "_boot.py").write_text(_BOOT.replace("__CONFIG__", repr({"root": root, **limits})), "utf-8")
        start = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", "_boot.py"],
            cwd=root,
            env=_child_env(root, token),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
            close_fds=True,
        )
        try:
            finished = _wait_unreaped(proc, timeout_s)
        finally:
            _kill_group(proc.pid)  # grandchildren still in the group die here, finished or not
            proc.wait()
            _sweep(token)
        seconds = time.monotonic() - start
        stdout, stderr = _read(out, max_output), _read(err, max_output)
    returncode = proc.returncode if finished else None
    killed = not finished or proc.returncode < 0
    return SandboxResult(returncode == 0, returncode, stdout, stderr, not finished, killed, seconds)


# ----------------------------------------------------------------------------------------------------------------------
# Parent side
# ----------------------------------------------------------------------------------------------------------------------


def _child_env(root: str, token: str) -> dict[str, str]:
    """The child's whole environment: nothing of the caller's (no secrets, proxies or HOME-based config)."""
    return {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": root,
        "TMPDIR": root,
        "PYTHONDONTWRITEBYTECODE": "1",
        TOKEN_VARIABLE: token,
    }


def _exited(proc: subprocess.Popen[bytes]) -> bool:
    """Whether the child has exited, *without* reaping it where possible (its pid then still pins the group id)."""
    if hasattr(os, "waitid"):
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    return proc.poll() is not None


def _wait_unreaped(proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """Poll until the child exits (True) or ``timeout_s`` passes (False); back off from 0.5 ms to 10 ms."""
    deadline = time.monotonic() + timeout_s
    delay = 0.0005
    while not _exited(proc):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(2 * delay, 0.01)
    return True


def _kill_group(pgid: int) -> None:
    """SIGKILL every process of the group ``pgid`` (none left is fine)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _sweep(token: str, passes: int = 5) -> None:
    """SIGKILL every process whose initial environment holds ``token`` (descendants that left the group)."""
    proc_root = Path("/proc")
    if not proc_root.is_dir():
        return
    needle = f"{TOKEN_VARIABLE}={token}".encode()
    for _ in range(passes):
        found = False
        for entry in proc_root.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if needle in (entry / "environ").read_bytes():
                    os.kill(int(entry.name), signal.SIGKILL)
                    found = True
            except OSError:  # gone, or not ours to read
                continue
        if not found:
            return
        time.sleep(0.01)


def _read(stream: IO[bytes], max_output: int) -> str:
    """Decode a captured stream, keeping its first and last ``max_output // 2`` characters when it is longer."""
    stream.seek(0)
    text = stream.read().decode("utf-8", errors="replace")
    if len(text) <= max_output:
        return text
    head, tail = max_output // 2, max_output - max_output // 2
    return f"{text[:head]}\n[... {len(text) - head - tail} characters cut ...]\n{text[-tail:]}"


# ----------------------------------------------------------------------------------------------------------------------
# Child side: the boot script (limits, then the prelude, then main.py as __main__)
# ----------------------------------------------------------------------------------------------------------------------

_BOOT = (
    r"""
import atexit, builtins, gc, io, os, posix, resource, shutil, socket, subprocess, sys, traceback, types
import _io, _posixsubprocess, _socket

CONFIG = __CONFIG__
ROOT = CONFIG["root"]
PID = os.getpid()


def _limit(which, soft, hard=None):
    hard = soft if hard is None else hard
    current = resource.getrlimit(which)[1]
    if current != resource.RLIM_INFINITY:
        soft, hard = min(soft, current), min(hard, current)
    resource.setrlimit(which, (soft, hard))


_limit(resource.RLIMIT_AS, CONFIG["as"])
_limit(resource.RLIMIT_CPU, CONFIG["cpu"], CONFIG["cpu"] + 1)
_limit(resource.RLIMIT_NPROC, CONFIG["nproc"])
_limit(resource.RLIMIT_NOFILE, CONFIG["nofile"])
_limit(resource.RLIMIT_FSIZE, """
    + str(MAX_FILE_BYTES)
    + r""")
_limit(resource.RLIMIT_CORE, 0)


def _denied(what):
    def denied(*args, **kwargs):
        raise PermissionError("sandbox: " + what + " is not allowed")
    return denied


# Processes: no new ones, no leaving the process group, no signals to others.
_PROCESS = ["fork", "forkpty", "system", "popen", "posix_spawn", "posix_spawnp", "setsid", "setpgid", "setpgrp",
            "killpg", "chroot", "setrlimit", "prlimit"]
_PROCESS += ["exec" + s for s in ("l", "le", "lp", "lpe", "v", "ve", "vp", "vpe")]
_PROCESS += ["spawn" + s for s in ("l", "le", "lp", "lpe", "v", "ve", "vp", "vpe")]
for _module in (os, posix, resource):
    for _name in _PROCESS:
        if hasattr(_module, _name):
            setattr(_module, _name, _denied(_module.__name__.replace("posix", "os") + "." + _name))

_kill = os.kill


def _own_kill(pid, sig):
    if pid not in (0, PID):
        raise PermissionError("sandbox: os.kill of another process is not allowed")
    return _kill(pid, sig)


os.kill = posix.kill = _own_kill


class _NoPopen(subprocess.Popen):
    def __init__(self, *args, **kwargs):
        raise PermissionError("sandbox: subprocess is not allowed")


subprocess.Popen = _NoPopen
_posixsubprocess.fork_exec = subprocess._fork_exec = _denied("_posixsubprocess.fork_exec")
for _name in ("multiprocessing", "ctypes", "_ctypes"):
    sys.modules[_name] = None  # import raises ImportError


# Network: no sockets, no name resolution.
class _NoSocket(socket.socket):
    def __init__(self, *args, **kwargs):
        raise PermissionError("sandbox: network access is not allowed")


for _module in (socket, _socket):
    _module.socket = _NoSocket
    for _name in ("socketpair", "fromfd", "create_connection", "create_server", "getaddrinfo", "gethostbyname",
                  "gethostbyname_ex", "gethostbyaddr", "getnameinfo"):
        if hasattr(_module, _name):
            setattr(_module, _name, _denied("socket." + _name))


# Files: write only inside ROOT (and /dev/null); read only ROOT, Python itself, /dev, zoneinfo and our own /proc.
_PREFIXES = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
_READABLE = tuple(p.rstrip(os.sep) + os.sep for p in _PREFIXES) + ("/dev/", "/usr/share/zoneinfo/", f"/proc/{PID}/")
_WRITABLE = (os.devnull,)
_realpath, _readlink, _fsdecode, _fspath = os.path.realpath, os.readlink, os.fsdecode, os.fspath


def _inside(real):
    return real == ROOT or real.startswith(ROOT + os.sep)


def _check(path, writing, dir_fd=None):
    if isinstance(path, int):  # an open descriptor: it passed this check when it was opened
        return
    text = _fspath(path)
    if isinstance(text, bytes):
        text = _fsdecode(text)
    if dir_fd is not None and not os.path.isabs(text):
        text = os.path.join(_readlink(f"/proc/self/fd/{dir_fd}"), text)
    real = _realpath(text)
    if _inside(real) or real in _WRITABLE or (not writing and (real.startswith(_READABLE) or real == f"/proc/{PID}")):
        return
    action = "writing" if writing else "reading"
    raise PermissionError(f"sandbox: {action} outside the sandbox folder is not allowed: {text!r}")


def _writes(mode):
    return any(c in mode for c in "wax+")


_open, _os_open, _FileIO = builtins.open, os.open, _io.FileIO
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _guarded_open(file, mode="r", *args, **kwargs):
    _check(file, _writes(mode))
    return _open(file, mode, *args, **kwargs)


def _guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
    _check(path, bool(flags & _WRITE_FLAGS), dir_fd)
    return _os_open(path, flags, mode, dir_fd=dir_fd)


class _GuardedFileIO(_FileIO):
    def __init__(self, file, mode="r", *args, **kwargs):
        _check(file, _writes(mode))
        super().__init__(file, mode, *args, **kwargs)


builtins.open = io.open = _io.open = _guarded_open
os.open = posix.open = _guarded_os_open
io.FileIO = _GuardedFileIO


def _guard_paths(name, *positions):
    original = getattr(os, name, None)
    if original is None:
        return

    def guarded(*args, **kwargs):
        for i, key in positions:
            if i < len(args):
                _check(args[i], True, kwargs.get(key, kwargs.get("dir_fd")))
        return original(*args, **kwargs)

    setattr(os, name, guarded)
    setattr(posix, name, guarded)


for _name in ("remove", "unlink", "rmdir", "mkdir", "chmod", "chown", "lchown", "truncate", "utime", "mkfifo",
              "mknod", "setxattr", "removexattr"):
    _guard_paths(_name, (0, "dir_fd"))
for _name in ("rename", "replace", "link"):
    _guard_paths(_name, (0, "src_dir_fd"), (1, "dst_dir_fd"))
_guard_paths("symlink", (1, "dir_fd"))
_rmtree = shutil.rmtree


def _guarded_rmtree(path, *args, **kwargs):
    _check(path, True, kwargs.get("dir_fd"))
    return _rmtree(path, *args, **kwargs)


shutil.rmtree = _guarded_rmtree

# Run main.py as __main__ (its own module, so pickle / dataclasses see it); the traceback starts in main.py.
_main_path = os.path.join(ROOT, "main.py")
with _open(_main_path, encoding="utf-8") as _file:
    _source = _file.read()
_main = types.ModuleType("__main__")
_main.__file__ = _main_path
_main.__builtins__ = builtins
sys.modules["__main__"] = _main
sys.argv = [_main_path]


def _finalize_main():
    # Registered first, so it runs last of the exit handlers: the code's objects are finalised while os, posixpath
    # and the guards still work (module teardown would otherwise break the path checks in their __del__).
    _main.__dict__.clear()
    gc.collect()


atexit.register(_finalize_main)
try:
    exec(compile(_source, _main_path, "exec"), _main.__dict__)
except SystemExit:
    raise
except BaseException as _exc:
    traceback.print_exception(type(_exc), _exc, _exc.__traceback__.tb_next)
    raise SystemExit(1)
"""
)
