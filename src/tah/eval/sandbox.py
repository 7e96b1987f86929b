"""Run untrusted Python (a model's code and a benchmark's tests) in a child process, never in ours.

Each program runs in a fresh `python -I` in a temporary working directory (also its HOME and
TMPDIR, deleted afterwards), in a session and process group of its own, with:

- a wall-clock limit: on expiry the whole process group is killed with SIGKILL (children too);
  the group is also killed when the program ends, so forked stragglers do not outlive it;
- resource limits set in the child before the program is compiled: address space (`memory_mb`,
  so unbounded allocation ends in MemoryError), CPU seconds (a backstop for the wall clock),
  16 MiB per written file, no core dumps;
- no network, two layers: where `unshare --net --map-root-user` works (Linux with user
  namespaces) the child runs in an empty network namespace, where no address is reachable; in
  every case `socket.socket`, `socket.create_connection` and friends are replaced by functions
  that raise before the program runs;
- a verdict that the program cannot fake by exiting early: it passes only if it ran to its end
  without an exception and the runner then printed a nonce that the program never saw (it is read
  from stdin and dropped before the program starts). `sys.exit`, `os._exit`, a signal or a crash
  all fail.

This is best effort, as in the human-eval harness: a program that escapes with ctypes, re-opens
the raw `_socket` module where no namespace is available, or starts a new session of its own
could get past it. Run benchmarks of untrusted models inside a container as well.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MEMORY_MB = 1024
DETAIL_CHARS = 500

# The child's first code: limits, no network, then the program. Reads its nonce from stdin.
RUNNER = r"""
import os, resource, socket, sys

def limit(kind, value):
    try:
        resource.setrlimit(kind, (value, value))
    except (ValueError, OSError):
        pass

memory_bytes, cpu_seconds = int(sys.argv[1]), int(sys.argv[2])
limit(resource.RLIMIT_AS, memory_bytes)
limit(resource.RLIMIT_CPU, cpu_seconds)
limit(resource.RLIMIT_FSIZE, 16 << 20)
limit(resource.RLIMIT_CORE, 0)

def no_network(*args, **kwargs):
    raise OSError("network access is disabled in the sandbox")

class NoSocket(socket.socket):
    def __init__(self, *args, **kwargs):
        no_network()

socket.socket = socket.SocketType = NoSocket
for name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
    setattr(socket, name, no_network)

nonce = sys.stdin.readline().strip()
sys.stdin = open(os.devnull)
with open("program.py", encoding="utf-8") as handle:
    source = handle.read()
try:
    exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
except BaseException as err:  # SystemExit too: a program that exits before its end has not passed
    sys.stderr.write(f"{type(err).__name__}: {err}"[-500:])
    sys.stderr.flush()
    os._exit(1)
sys.stdout.write("\n" + nonce + "\n")
sys.stdout.flush()
os._exit(0)  # skip atexit handlers and threads the program left behind
"""


@dataclass(frozen=True)
class SandboxResult:
    status: str  # "passed", "failed" or "timeout"
    detail: str  # the end of the program's stderr (the exception), or why it was stopped
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@functools.cache
def network_namespace_prefix() -> tuple[str, ...]:
    """The command prefix that runs a child without network, or () where this system cannot."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    for prefix in ((unshare, "--net", "--map-root-user"), (unshare, "--net")):
        try:
            probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            return prefix
    return ()


def run_program(source: str, timeout_s: float = DEFAULT_TIMEOUT_S,
                memory_mb: int = DEFAULT_MEMORY_MB) -> SandboxResult:
    """Run the Python `source` in a sandboxed child (see the module docstring) and say whether it
    ran to its end. Never raises for anything the program does; raises OSError only if no child
    can be started at all."""
    nonce = secrets.token_hex(16)
    command = [*network_namespace_prefix(), sys.executable, "-I", "-B", "-c", RUNNER,
               str(memory_mb << 20), str(int(timeout_s) + 1)]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tah-sandbox-") as workdir:
        with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as handle:
            handle.write(source)
        env = {"PATH": os.defpath, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        stdout_path, stderr_path = os.path.join(workdir, "stdout"), os.path.join(workdir, "stderr")
        with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
            child = subprocess.Popen(command, cwd=workdir, env=env, stdin=subprocess.PIPE, stdout=stdout,
                                     stderr=stderr, start_new_session=True)
            timed_out = _wait(child, nonce, timeout_s)
        seconds = time.perf_counter() - started
        if timed_out:
            return SandboxResult("timeout", f"killed after the {timeout_s:g} s time limit", seconds)
        printed = _tail(stdout_path, 200)
        if child.returncode == 0 and printed.rstrip().endswith(nonce):
            return SandboxResult("passed", "", seconds)
        detail = _tail(stderr_path, DETAIL_CHARS).strip() or _exit_reason(child.returncode)
        return SandboxResult("failed", detail, seconds)


def run_programs(sources: list[str], timeout_s: float = DEFAULT_TIMEOUT_S, memory_mb: int = DEFAULT_MEMORY_MB,
                 workers: int | None = None) -> list[SandboxResult]:
    """`run_program` over `sources`, `workers` children at a time (default: the CPU count, at most 8);
    results in the order of `sources`."""
    workers = workers or min(8, os.cpu_count() or 1)
    if len(sources) <= 1 or workers == 1:
        return [run_program(source, timeout_s, memory_mb) for source in sources]
    with ThreadPoolExecutor(max_workers=workers) as pool:  # threads only wait on children
        return list(pool.map(lambda source: run_program(source, timeout_s, memory_mb), sources))


def _wait(child: subprocess.Popen, nonce: str, timeout_s: float) -> bool:
    """Hand the child its nonce, wait up to timeout_s, then kill its group. True if it timed out."""
    try:
        child.stdin.write(nonce.encode() + b"\n")
        child.stdin.close()
    except OSError:  # it died before reading: the exit code tells
        pass
    try:
        child.wait(timeout=timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
    try:
        os.killpg(child.pid, signal.SIGKILL)  # the group is the child's own (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass
    child.wait()
    return timed_out


def _tail(path: str, chars: int) -> str:
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        handle.seek(max(0, handle.tell() - 4 * chars))
        return handle.read().decode("utf-8", "replace")[-chars:]


def _exit_reason(returncode: int) -> str:
    if returncode < 0:
        return f"killed by signal {signal.Signals(-returncode).name}"
    return f"exited with status {returncode} before the end of the tests"
