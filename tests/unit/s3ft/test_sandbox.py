"""The sandbox contains model-written code: limits hold, nothing survives a run, nothing leaks in or out.

Processes are found by scanning ``/proc`` (psutil is not a dependency): a process counts as alive unless it is gone or
a zombie (state Z / X; an orphan killed in this container may stay a zombie if PID 1 does not reap it).
"""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ftmods.s3ft.sandbox import SandboxResult, run_python

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox tests read /proc (Linux)")

# Undo the prelude the way determined code could: drop the patched modules and import fresh copies.
BYPASS_SUBPROCESS = """
import sys
for name in ("subprocess", "_posixsubprocess"):
    sys.modules.pop(name, None)
import subprocess
"""


def _state(pid: int) -> str | None:
    """Process state letter (R, S, Z, ...) or None when there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    return _state(pid) not in (None, "Z", "X")


def _with_marker(marker: str) -> list[int]:
    """Living processes whose command line contains ``marker``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline and _alive(int(entry.name)):
                pids.append(int(entry.name))
    return pids


def _eventually_dead(pids: list[int], within_s: float = 2.0) -> list[int]:
    """The pids still alive after up to ``within_s`` (SIGKILL is delivered asynchronously)."""
    deadline = time.monotonic() + within_s
    while (alive := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.02)
    return alive


@pytest.fixture
def marker() -> Iterator[str]:
    """A unique string for command lines; any process still carrying it afterwards is killed (and fails the test)."""
    text = f"ftmods-sandbox-test-{uuid.uuid4().hex}"
    yield text
    for pid in _with_marker(text):
        os.kill(pid, signal.SIGKILL)


def _sleeper(marker: str, **popen_kwargs: str) -> str:
    """Code line starting a sleeping Python child whose command line carries ``marker``."""
    kwargs = "".join(f", {key}={value}" for key, value in popen_kwargs.items())
    return f'subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "{marker}"]{kwargs})\n'


# ----------------------------------------------------------------------------------------------------------------------
# Ordinary code
# ----------------------------------------------------------------------------------------------------------------------


def test_stdout_is_captured_and_the_folder_is_deleted() -> None:
    code = "import os\nprint('hello', 6 * 7)\nopen('scratch.txt', 'w').write('inside is fine')\nprint(os.getcwd())\n"
    result = run_python(code)
    assert isinstance(result, SandboxResult)
    assert (result.ok, result.returncode, result.timed_out, result.killed) == (True, 0, False, False)
    first, folder = result.stdout.splitlines()
    assert first == "hello 42"
    assert Path(folder).name.startswith("ftmods-sandbox-")
    assert not Path(folder).exists()
    assert result.stderr == ""


def test_exit_status_and_traceback() -> None:
    assert run_python("raise SystemExit(3)").returncode == 3
    result = run_python("def f():\n    return 1 / 0\nf()\n")
    assert (result.ok, result.returncode, result.killed) == (False, 1, False)
    assert result.stderr.rstrip().endswith("ZeroDivisionError: division by zero")
    assert "main.py" in result.stderr


def test_stdlib_works_without_site() -> None:
    code = (
        "import collections, dataclasses, heapq, itertools, json, math, pickle, re, tempfile, threading\n"
        "@dataclasses.dataclass\nclass P:\n    x: int\n"
        "print(pickle.loads(pickle.dumps(P(3))).x, math.comb(5, 2), json.dumps(sorted(heapq.nlargest(2, [3, 1, 4]))))\n"
        "with tempfile.NamedTemporaryFile() as f:\n    f.write(b'x')\n"
    )
    result = run_python(code)
    assert result.ok, result.stderr
    assert result.stdout == "3 10 [3, 4]\n"


def test_long_output_keeps_head_and_tail() -> None:
    result = run_python("print('A' * 50_000)\nprint('END')", max_output=1000)
    assert result.ok
    assert len(result.stdout) < 1100
    assert result.stdout.startswith("A" * 500)
    assert result.stdout.rstrip().endswith("END")
    assert "characters cut" in result.stdout


@pytest.mark.parametrize("kwargs", [{"timeout_s": 0}, {"memory_mb": -1}, {"cpu_s": 0}, {"max_output": 0}])
def test_rejects_non_positive_limits(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="positive"):
        run_python("pass", **kwargs)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------------------
# Runaway code
# ----------------------------------------------------------------------------------------------------------------------


def test_infinite_loop_is_killed_at_the_timeout() -> None:
    result = run_python("while True:\n    pass\n", timeout_s=1.0)
    assert (result.ok, result.timed_out, result.killed, result.returncode) == (False, True, True, None)
    assert 1.0 <= result.seconds < 3.0


def test_cpu_limit_kills_before_a_long_timeout() -> None:
    result = run_python("while True:\n    pass\n", timeout_s=20.0, cpu_s=1)
    assert (result.ok, result.timed_out, result.killed) == (False, False, True)
    assert result.returncode in (-signal.SIGXCPU, -signal.SIGKILL)
    assert result.seconds < 5.0


@pytest.mark.parametrize(
    "code", ["x = bytearray(10**10)\n", "chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))\n"]
)
def test_huge_allocation_fails(code: str) -> None:
    result = run_python(code, memory_mb=256, timeout_s=10.0)
    assert not result.ok
    assert "MemoryError" in result.stderr or result.killed
    assert result.seconds < 8.0


def test_fork_bomb_is_refused_by_the_prelude() -> None:
    result = run_python("import os\nwhile True:\n    os.fork()\n")
    assert (result.ok, result.timed_out) == (False, False)
    assert result.stderr.rstrip().endswith("PermissionError: sandbox: os.fork is not allowed")


def test_forks_past_the_prelude_die_with_the_group() -> None:
    """ctypes' fork skips the prelude; 3 forks make 8 sleepers, all killed with the process group at the timeout."""
    code = (
        "import sys, os, time\n"
        "for name in ('ctypes', '_ctypes'):\n    sys.modules.pop(name, None)\n"
        "import ctypes\nlibc = ctypes.CDLL(None)\n"
        "for _ in range(3):\n    libc.fork()\n"
        "print(os.getpid(), flush=True)\ntime.sleep(30)\n"
    )
    result = run_python(code, timeout_s=1.5)
    pids = [int(line) for line in result.stdout.split()]
    assert result.timed_out
    assert len(set(pids)) == 8
    assert _eventually_dead(pids) == []


@pytest.mark.parametrize("main_ends", ["sleeps", "exits"])
def test_grandchild_past_the_prelude_is_killed(marker: str, main_ends: str) -> None:
    """A sleeping grandchild dies with the group, whether the main process times out or exits at once."""
    code = BYPASS_SUBPROCESS + _sleeper(marker) + "import time\ntime.sleep(0.3)\n"
    code += "time.sleep(30)\n" if main_ends == "sleeps" else ""
    result = run_python(code, timeout_s=1.5)
    assert result.timed_out == (main_ends == "sleeps")
    assert result.seconds < 3.0  # an exiting main is not held up by the grandchild
    assert _eventually_dead(_with_marker(marker)) == []


def test_grandchild_in_its_own_session_is_swept(marker: str) -> None:
    """``start_new_session`` leaves the process group; the sweep finds it by the run's environment token."""
    code = BYPASS_SUBPROCESS + _sleeper(marker, start_new_session="True") + "import time\ntime.sleep(0.3)\n"
    result = run_python(code, timeout_s=5.0)
    assert result.ok, result.stderr
    assert _eventually_dead(_with_marker(marker)) == []


def test_subprocess_is_refused_by_the_prelude(marker: str) -> None:
    result = run_python("import subprocess, sys\n" + _sleeper(marker))
    assert not result.ok
    assert "PermissionError: sandbox: subprocess is not allowed" in result.stderr
    assert _with_marker(marker) == []


# ----------------------------------------------------------------------------------------------------------------------
# Leaks: files, environment, network
# ----------------------------------------------------------------------------------------------------------------------


def test_cannot_write_or_delete_outside_the_folder(tmp_path: Path) -> None:
    outside, keep, tree = tmp_path / "outside.txt", tmp_path / "keep.txt", tmp_path / "tree"
    keep.write_text("precious")
    tree.mkdir()
    (tree / "leaf.txt").write_text("leaf")
    attempts = [
        f"open({str(outside)!r}, 'w').write('x')",
        f"pathlib.Path({str(outside)!r}).write_text('x')",
        f"os.close(os.open({str(outside)!r}, os.O_WRONLY | os.O_CREAT))",
        f"io.FileIO({str(outside)!r}, 'w')",
        "open('../ftmods-escape-{}.txt'.format(os.getpid()), 'w')",
        f"os.remove({str(keep)!r})",
        f"os.rename({str(keep)!r}, 'stolen.txt')",
        f"shutil.rmtree({str(tree)!r})",
        f"os.symlink({str(tmp_path)!r}, 'link'); open('link/outside.txt', 'w')",
    ]
    code = "import io, os, pathlib, shutil\n" + "".join(
        f"try:\n    {a}\n    print('ESCAPED', {a!r})\nexcept PermissionError:\n    print('refused')\n" for a in attempts
    )
    result = run_python(code)
    assert result.ok, result.stderr
    assert result.stdout.split() == ["refused"] * len(attempts)
    assert not outside.exists()
    assert keep.read_text() == "precious"
    assert (tree / "leaf.txt").read_text() == "leaf"


def test_environment_and_secrets_stay_out(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    monkeypatch.setenv("FTMODS_SECRET", secret)
    code = (
        "import os\nprint(sorted(os.environ))\nprint(os.environ['HOME'] == os.getcwd())\n"
        "for path in ('/proc/%d/environ' % os.getppid(), os.path.expanduser('~/../../root/.netrc')):\n"
        "    try:\n        print(open(path, 'rb').read())\n    except (PermissionError, FileNotFoundError) as exc:\n"
        "        print(type(exc).__name__)\n"
    )
    result = run_python(code)
    assert result.ok, result.stderr
    assert secret not in result.stdout + result.stderr
    names, home_is_cwd, *reads = result.stdout.splitlines()
    assert "FTMODS_SECRET" not in names
    assert home_is_cwd == "True"
    assert reads[0] == "PermissionError"


@pytest.mark.parametrize(
    "code",
    [
        "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=5)\n",
        "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM)\n",
        "import socket\nsocket.getaddrinfo('example.com', 80)\n",
        "import urllib.request\nurllib.request.urlopen('http://1.1.1.1', timeout=5)\n",
    ],
)
def test_network_is_refused_quickly(code: str) -> None:
    result = run_python(code, timeout_s=10.0)
    assert not result.ok
    assert "sandbox:" in result.stderr
    assert result.seconds < 2.0


def test_resource_limits_cannot_be_raised() -> None:
    code = "import resource\nresource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY,) * 2)\n"
    result = run_python(code)
    assert "PermissionError: sandbox: resource.setrlimit is not allowed" in result.stderr
    limits = run_python("import resource\nprint(resource.getrlimit(resource.RLIMIT_AS))", memory_mb=300)
    assert limits.stdout.strip() == f"({300 * 2**20}, {300 * 2**20})"
