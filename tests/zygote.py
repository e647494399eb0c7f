"""A fork server for the suite's `python -m bioscanfs` runs: the same code, without the start.

Every CLI run and mount of the suite is `python -m bioscanfs ARGS`, and each paid ~0.35 s of
CPU for the interpreter's start and its imports (numpy alone 0.2 s) before doing anything:
of the suite's CPU, about a third. Here one interpreter per test process (the zygote) imports
what `python -m bioscanfs` imports at start (``bioscanfs.cli``), then forks a child per run
that takes the test's argv, environment, folder, umask, resource limits and stdio, and runs
``bioscanfs`` as ``python -m`` does (``runpy``: same ``sys.argv[0]``, same program name in
click's messages). The test gets a process with a pid it can signal, an exit status as the
interpreter would give it (a code, or minus the signal), and output in the files or
descriptors it chose.

The zygote is a process of its own, started with ``python zygote.py`` by the test process,
so that it is single-threaded when it forks (a pytest-xdist worker has threads). It changes no
signal disposition and reaps its children through pidfds, not SIGCHLD, so a child starts
with the dispositions of a fresh interpreter. It rewrites the child's /proc/PID/cmdline to
``python -m bioscanfs ARGS`` (as setproctitle does: the zygote's own command line is padded
to make room), since the tests find a daemon's server by its command line.

What stays a real interpreter (``spawn`` falls back to ``subprocess.Popen``): runs with an
environment that differs in what is read at the interpreter's start or at import (see
``RUNTIME_ENV`` for what may differ), and runs behind a prefix
(setpriv). Tests whose subject is the start itself (what gets imported, the installed
command) run their own interpreter and do not come here.
"""
from __future__ import annotations

import array
import atexit
import io
import json
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import traceback
from typing import Dict, List, Optional, Sequence, Tuple, Union

#: Environment variables a child may set otherwise than the zygote had them: read by the
#: code when it runs, not at the interpreter's start or at an import the zygote did; or
#: not read at all (pytest names the running test in PYTEST_CURRENT_TEST).
RUNTIME_ENV = frozenset({"HOME", "XDG_CACHE_HOME", "PYTEST_CURRENT_TEST"})
#: Room for the children's command lines, in the zygote's own (two arguments of the
#: kernel's largest, MAX_ARG_STRLEN 128 KiB, less their NULs).
_PAD = "x" * ((128 << 10) - 1)
_MAX_FDS = 3
#: The resource limits a child takes from the test process, as it would inherit them
#: (tests lower RLIMIT_NOFILE to provoke EMFILE).
_LIMITS = ("RLIMIT_NOFILE", "RLIMIT_AS", "RLIMIT_DATA", "RLIMIT_FSIZE", "RLIMIT_CORE", "RLIMIT_STACK",
           "RLIMIT_CPU", "RLIMIT_NPROC", "RLIMIT_MEMLOCK")
StdioSpec = Union[None, int, io.IOBase]


# -- the zygote (server side) -------------------------------------------------------------------
def _cmdline_span() -> Tuple[int, int]:
    """Where this process's argv strings live in its memory (proc(5): arg_start, arg_end)."""
    fields = open("/proc/self/stat").read().rpartition(")")[2].split()
    return int(fields[45]), int(fields[46])   # fields 48 and 49, counted from 1, pid and comm apart


def _set_cmdline(argv: Sequence[str], span: Tuple[int, int]) -> None:
    """Make /proc/self/cmdline read ``argv`` (the client checked that it fits)."""
    start, end = span
    text = b"".join(os.fsencode(a) + b"\0" for a in argv)
    with open("/proc/self/mem", "r+b", buffering=0) as mem:
        mem.seek(start)
        mem.write(text.ljust(end - start, b"\0"))


def _fresh_stdio() -> None:
    """sys.stdin/stdout/stderr over the new descriptors 0-2, buffered as a fresh interpreter
    buffers them (Python/pylifecycle.c create_stdio: line-buffered on a terminal, stderr
    always; with PYTHONUNBUFFERED, output written through)."""
    unbuffered = sys.__stderr__.write_through   # -u or PYTHONUNBUFFERED, as the zygote started

    def wrap(fd: int, name: str) -> io.TextIOWrapper:
        old = getattr(sys, f"__{name}__")
        writes = name != "stdin"
        raw = io.open(fd, "wb" if writes else "rb", buffering=0 if unbuffered and writes else -1, closefd=False)
        return io.TextIOWrapper(raw, encoding=old.encoding, errors=old.errors, newline="\n",
                                line_buffering=not unbuffered and (name == "stderr" or os.isatty(fd)),
                                write_through=unbuffered)
    sys.stdin = sys.__stdin__ = wrap(0, "stdin")
    sys.stdout = sys.__stdout__ = wrap(1, "stdout")
    sys.stderr = sys.__stderr__ = wrap(2, "stderr")


def _exit_code(err: SystemExit) -> int:
    """The status an interpreter ends with on ``sys.exit(code)`` (a message goes to stderr)."""
    if err.code is None:
        return 0
    if isinstance(err.code, int):
        return err.code & 0xFF
    print(err.code, file=sys.stderr)
    return 1


def _run_as_main() -> int:
    """``python -m bioscanfs``'s body and ending: the module run as __main__, then the
    interpreter's shutdown (non-daemon threads joined, atexit, stdio flushed)."""
    import runpy
    try:
        runpy.run_module("bioscanfs", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as err:
        code = _exit_code(err)
    except KeyboardInterrupt:   # the interpreter ends killed by the SIGINT it got
        traceback.print_exc()
        code = -signal.SIGINT
    except BaseException:
        traceback.print_exc()
        code = 1
    threading._shutdown()   # type: ignore[attr-defined]  # as Py_FinalizeEx does first
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            code = code or 120   # what the interpreter returns when the flush at exit fails
    return code


def _child(request: Dict[str, object], fds: List[int], span: Tuple[int, int]) -> None:
    """In the forked child: become the requested run, then end with its status."""
    code = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))   # the zygote's sockets and pidfds
        os.chdir(str(request["cwd"]))
        os.umask(int(request["umask"]))   # type: ignore[call-overload]
        for name, limits in request["limits"].items():   # type: ignore[attr-defined]
            if resource.getrlimit(getattr(resource, name)) != tuple(limits):
                resource.setrlimit(getattr(resource, name), tuple(limits))
        os.environ.clear()
        os.environ.update(request["env"])   # type: ignore[arg-type]
        sys.path[0] = os.getcwd()   # as -m sets it
        argv = [str(a) for a in request["argv"]]   # type: ignore[attr-defined]
        _set_cmdline([sys.executable, "-m", "bioscanfs", *argv], span)
        sys.argv = ["-m", *argv]   # runpy puts the module's path first, as -m does
        _fresh_stdio()
        code = _run_as_main()
    except BaseException:   # before the run: a defect of this module, shown on the run's stderr
        traceback.print_exc()
    finally:
        if code < 0:
            signal.signal(-code, signal.SIG_DFL)
            os.kill(os.getpid(), -code)
        os._exit(code)


def _serve(path: str) -> None:
    """Accept runs on the socket at ``path`` until the test process closes our stdin."""
    import bioscanfs.cli  # noqa: F401  # what `python -m bioscanfs` imports before it runs
    span = _cmdline_span()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(64)
    waiting = select.poll()
    waiting.register(listener, select.POLLIN)
    waiting.register(0, select.POLLIN)
    children: Dict[int, Tuple[int, socket.socket]] = {}   # pidfd -> (pid, connection)
    sys.stdout.write(f"{span[1] - span[0]}\n")
    sys.stdout.flush()
    while True:
        for fd, _ in waiting.poll():
            if fd == 0:
                return
            if fd == listener.fileno():
                conn, _ = listener.accept()
                message, ancillary, _, _ = conn.recvmsg(1 << 20, socket.CMSG_SPACE(_MAX_FDS * 4))
                fds = array.array("i")
                for _, _, data in ancillary:
                    fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
                pid = os.fork()
                if pid == 0:
                    _child(json.loads(message), list(fds), span)
                for received in fds:
                    os.close(received)
                pidfd = os.pidfd_open(pid)
                children[pidfd] = (pid, conn)
                waiting.register(pidfd, select.POLLIN)
                conn.send(json.dumps({"pid": pid}).encode())
            else:
                pid, conn = children.pop(fd)
                waiting.unregister(fd)
                os.close(fd)
                _, status = os.waitpid(pid, 0)
                try:
                    conn.send(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode())
                except OSError:
                    pass   # the test stopped waiting for it
                conn.close()


# -- the test process's side ------------------------------------------------------------------
class ForkedProcess:
    """A run forked by the zygote, with the part of ``subprocess.Popen`` the tests use."""

    def __init__(self, args: List[str], conn: socket.socket) -> None:
        self.args = args
        self._conn = conn
        self.pid: int = json.loads(conn.recv(4096))["pid"]
        self.returncode: Optional[int] = None

    def _receive(self, timeout: Optional[float]) -> None:
        self._conn.settimeout(timeout)
        try:
            message = self._conn.recv(4096)
        except (socket.timeout, BlockingIOError):
            return
        self.returncode = json.loads(message)["returncode"] if message else -signal.SIGKILL
        self._conn.close()

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            self._receive(0)
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        if self.returncode is None:
            self._receive(timeout)
            if self.returncode is None:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


class _Zygote:
    """The zygote of this test process, started on first use, ended with it."""

    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="bioscanfs-zygote-")
        self.path = os.path.join(self.folder, "socket")
        self.env = dict(os.environ)
        self.proc = subprocess.Popen([sys.executable, __file__, self.path, _PAD, _PAD],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd="/")
        assert self.proc.stdout is not None
        self.room = int(self.proc.stdout.readline() or 0)
        if not self.room:
            raise RuntimeError(f"the zygote did not start (exit {self.proc.wait()})")
        atexit.register(self.close)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait()
        os.unlink(self.path)
        os.rmdir(self.folder)

    def fits(self, argv: Sequence[str], env: Dict[str, str]) -> bool:
        """Can a child of this zygote run ``argv`` with ``env`` as a new interpreter would?"""
        changed = {k for k in env.keys() | self.env.keys() if env.get(k) != self.env.get(k)}
        cmdline = sum(len(os.fsencode(a)) + 1 for a in [sys.executable, "-m", "bioscanfs", *argv])
        return changed <= RUNTIME_ENV and cmdline <= self.room

    def spawn(self, argv: List[str], env: Dict[str, str], fds: Sequence[int]) -> ForkedProcess:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        conn.connect(self.path)
        umask = os.umask(0o22)
        os.umask(umask)
        limits = {name: resource.getrlimit(getattr(resource, name)) for name in _LIMITS}
        request = json.dumps({"argv": argv, "env": env, "cwd": os.getcwd(), "umask": umask,
                              "limits": limits}).encode()
        conn.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        return ForkedProcess(argv, conn)


_zygote: Optional[_Zygote] = None
_zygote_pid = 0


def _descriptor(spec: StdioSpec, default: int, closing: List[int]) -> int:
    """A descriptor for one of stdin/stdout/stderr: ``spec`` (DEVNULL, a file, a descriptor)."""
    if spec is None:
        return default
    if spec == subprocess.DEVNULL:
        fd = os.open(os.devnull, os.O_RDWR)
        closing.append(fd)
        return fd
    if isinstance(spec, int):
        return spec
    return spec.fileno()


def spawn(argv: Sequence[object], *, stdin: StdioSpec = None, stdout: StdioSpec = None,
          stderr: StdioSpec = None, env: Optional[Dict[str, str]] = None
          ) -> Union[ForkedProcess, "subprocess.Popen[bytes]"]:
    """``python -m bioscanfs ARGV`` with this stdio (None: ours; DEVNULL, a descriptor, a file;
    stderr may be STDOUT; no pipes) and environment (default: ours): forked by the zygote, or
    a real interpreter where the zygote cannot stand for one (see the module's docstring)."""
    global _zygote, _zygote_pid
    args = [str(a) for a in argv]
    env = dict(os.environ if env is None else env)
    if _zygote is None or _zygote_pid != os.getpid():
        _zygote, _zygote_pid = _Zygote(), os.getpid()
    if not _zygote.fits(args, env):
        return subprocess.Popen([sys.executable, "-m", "bioscanfs", *args], stdin=stdin, stdout=stdout,
                                stderr=stderr, env=env)
    closing: List[int] = []
    try:
        fds = [_descriptor(stdin, 0, closing), _descriptor(stdout, 1, closing)]
        fds.append(fds[1] if stderr == subprocess.STDOUT else _descriptor(stderr, 2, closing))
        return _zygote.spawn(args, env, fds)
    finally:
        for fd in closing:
            os.close(fd)


if __name__ == "__main__":
    _serve(sys.argv[1])
