"""A preloaded fork server for CPU cells: the stack is imported once, every cell is a fresh child.

Why: a worker started as a fresh interpreter spends seconds importing torch, transformers
and the project before its first event, and on the cpu preset that was about a third of
the matrix's wall time. The server pays those imports once. Each cell is then a child
forked from it, so each cell still has a process of its own that starts from the same
clean state: a crash, an OOM kill or a leak stays in that child.

What keeps forking safe here:

- **No CUDA.** The server never initialises CUDA (a process that has cannot be forked
  safely); it checks ``torch.cuda.is_initialized()`` after preloading and refuses to serve
  otherwise. The runner sends it CPU cells only: CUDA cells and torchrun launches keep
  fresh interpreters (``launcher``).
- **No computation.** The server only imports, so no OpenMP pool exists to be copied
  half-locked into a child; each child creates its own. It has one Python thread when it
  forks (numpy's OpenBLAS keeps a native one and re-creates it in the child itself).
- **What a process owns, each child owns.** Its stdout (the runner's events pipe), its
  stderr (the cell's log), its exit status (the server reaps it and reports the status as
  subprocess does: negative for a signal), its signal handlers back at Python's defaults,
  SIGTERM when the server dies (as the runner's children get when the runner dies), and
  exit handlers of its own only (the server's belong to the server).

Protocol: a SOCK_SEQPACKET socket pair. The runner sends one message per child, JSON
``{"entry": "module:function", "argv": [...]}``, with three descriptors: the child's
stdout, its stderr and a status pipe. The server forks, writes ``{"pid": N}`` to the status
pipe, and, once it has reaped the child, ``{"returncode": R}``; then it closes the pipe.
Runs as ``python -m gputech_bench.run.forkserver --fd N --preload MODULE,...``.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, Callable, Union

from ..worker.provenance import FORKED_ENV
from .launch import die_with_parent

#: What a child runs: a function taking its argv (returning an exit code, or None for 0), or
#: its ``"module:function"`` name, which is how it crosses to the server (``entry_name``).
Entry = Union[str, Callable[[list[str]], Any]]
#: Preloading on a loaded 2-core machine has taken 30 s; past this the server is given up.
BOOT_TIMEOUT_SECONDS = 300.0
#: A fork takes milliseconds; past this the server is taken for stuck.
SPAWN_TIMEOUT_SECONDS = 60.0
#: One request; the config and arguments of a cell are a few kB.
MESSAGE_BYTES = 1 << 20


class ForkServerError(RuntimeError):
    """The fork server could not start or could not fork: the caller starts a fresh interpreter."""


def entry_name(entry: Entry) -> str:
    """The one place a child's entry becomes the ``"module:function"`` the server imports."""
    if isinstance(entry, str):
        return entry
    return f"{entry.__module__}:{entry.__qualname__}"


# --------------------------------------------------------------------------- the runner's side


class ForkServer:
    """The runner's handle on one fork server; started on first use, stopped by ``close()``.

    ``preload`` names the modules the server imports before it serves: its caller's choice
    (the worker's stack, and the estimate's tracer after a run), so that this module names
    none of the layers above it. ``failure`` says why the server is not in use when it failed
    to start or died; the runner then starts fresh interpreters, as it always did.
    """

    def __init__(self, log_path: Path, preload: tuple[str, ...], boot_timeout: float = BOOT_TIMEOUT_SECONDS):
        self.log_path = Path(log_path)
        self.preload = preload
        self.boot_timeout = boot_timeout
        self.failure: str | None = None
        self.hello: dict[str, Any] | None = None
        self._process: subprocess.Popen | None = None
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> ForkServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self) -> bool:
        """Start the server and wait until it has preloaded; False (and ``failure``) when it cannot serve.

        Started from the thread that runs the matrix: the server gets SIGTERM when the
        thread that started it ends, as the runner's own workers do."""
        with self._lock:
            if self.failure is not None:
                return False
            if self._process is not None:
                if self._process.poll() is None:
                    return True
                self.failure = f"the fork server stopped (exit code {self._process.returncode}); see {self.log_path}"
                return False
            try:
                self._boot()
            except ForkServerError as error:
                self.failure = str(error)
                self._shut_down()
                return False
            except BaseException:  # Ctrl-C while it preloads: nothing may outlive the runner
                self._shut_down()
                raise
            return True

    def _boot(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._socket = ours
        with theirs, self.log_path.open("a", encoding="utf-8") as log:
            command = [sys.executable, "-m", __name__, "--fd", str(theirs.fileno()), "--preload", ",".join(self.preload)]
            self._process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=[theirs.fileno()],
                preexec_fn=die_with_parent if os.name == "posix" else None,
            )
        deadline = time.monotonic() + self.boot_timeout
        while True:
            # In slices, so that Ctrl-C is acted on while the server imports.
            ready, _, _ = select.select([ours], [], [], min(0.2, max(0.0, deadline - time.monotonic())))
            if ready:
                break
            if self._process.poll() is not None:
                raise ForkServerError(f"the fork server exited with code {self._process.returncode} while preloading; see {self.log_path}")
            if time.monotonic() >= deadline:
                raise ForkServerError(f"the fork server did not finish preloading in {self.boot_timeout:g} s; see {self.log_path}")
        message = ours.recv(MESSAGE_BYTES)
        hello = json.loads(message) if message else {"ready": False, "error": f"it closed its socket; see {self.log_path}"}
        if not hello.get("ready"):
            raise ForkServerError(f"the fork server could not preload ({hello.get('error')})")
        self.hello = hello

    def spawn(self, entry: Entry, argv: list[str], stdout: int, stderr: int,
              environment: dict[str, str] | None = None) -> ForkedProcess:
        """A child running ``entry(argv)`` with these descriptors as its stdout and stderr, and
        ``environment`` set in its ``os.environ`` before the entry runs."""
        if not self.start():
            raise ForkServerError(self.failure or "the fork server is not running")
        assert self._socket is not None
        status_read, status_write = os.pipe()
        try:
            request = json.dumps({"entry": entry_name(entry), "argv": argv, "env": environment or {}}).encode("utf-8")
            with self._lock:
                socket.send_fds(self._socket, [request], [stdout, stderr, status_write])
        except OSError as error:
            os.close(status_read)
            self.failure = f"the fork server stopped ({error.strerror or error}); see {self.log_path}"
            raise ForkServerError(self.failure) from None
        finally:
            os.close(status_write)
        child = ForkedProcess(status_read, [entry_name(entry), *argv])
        try:
            child.read_pid(SPAWN_TIMEOUT_SECONDS)
        except ForkServerError as error:
            self.failure = str(error)
            raise
        return child

    def spawn_piped(self, entry: Entry, argv: list[str], log: IO[str],
                    environment: dict[str, str] | None = None) -> ForkedProcess:
        """A child running ``entry(argv)`` as ``Popen(stdout=PIPE, stderr=log, text=True)`` would:
        a cell's worker, whose events the runner reads from ``stdout``."""
        events_read, events_write = os.pipe()
        try:
            child = self.spawn(entry, argv, events_write, log.fileno(), environment)
        except BaseException:
            os.close(events_read)
            raise
        finally:
            os.close(events_write)
        child.stdout = os.fdopen(events_read, "r")  # text, as Popen(text=True) reads it
        return child

    def output(self, entry: Entry, argv: list[str], stderr: int) -> str:
        """Run ``entry(argv)`` in a child and return what it printed; raises ForkServerError
        when it cannot be forked or does not exit with 0."""
        read, write = os.pipe()
        try:
            child = self.spawn(entry, argv, write, stderr)
        except BaseException:
            os.close(read)
            raise
        finally:
            os.close(write)
        with os.fdopen(read, "r") as stdout:
            text = stdout.read()
        if child.wait() != 0:
            raise ForkServerError(f"{entry_name(entry)} exited with {child.returncode if child.returncode is not None else child.lost}")
        return text

    def close(self) -> None:
        """Stop the server: it exits when its socket closes, and is killed if it does not."""
        with self._lock:
            self._shut_down()

    def _shut_down(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class ForkedProcess:
    """A child of the fork server, with the part of ``subprocess.Popen`` the runner uses:
    ``pid``, ``stdout``, ``poll``, ``wait`` (raising ``subprocess.TimeoutExpired``),
    ``terminate``, ``kill`` and ``returncode``. ``lost`` says why the status is unknown
    when the server died before reporting it."""

    def __init__(self, status_fd: int, args: list[str]):
        self.args = args
        self.pid: int | None = None
        self.returncode: int | None = None
        self.stdout: IO[str] | None = None
        self.lost: str | None = None
        self._status_fd: int | None = status_fd
        self._buffer = b""
        self._pidfd: int | None = None

    def read_pid(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.pid is None:
            if not self._read_status(max(0.0, deadline - time.monotonic())):
                if self._status_fd is None:
                    raise ForkServerError("the fork server stopped before it forked the cell")
                if time.monotonic() >= deadline:
                    self._close_status()
                    raise ForkServerError(f"the fork server did not fork the cell within {timeout:g} s")
        # A pidfd names this process and no later one with a reused pid: signals sent
        # through it cannot reach another process once the server has reaped this one.
        if self.returncode is None and hasattr(os, "pidfd_open"):
            try:
                self._pidfd = os.pidfd_open(self.pid)
            except OSError:
                self._pidfd = None

    def _read_status(self, timeout: float) -> bool:
        """Read what the server reported, waiting up to ``timeout``; False when nothing came."""
        if self._status_fd is None:
            return False
        ready, _, _ = select.select([self._status_fd], [], [], timeout)
        if not ready:
            return False
        chunk = os.read(self._status_fd, 4096)
        if not chunk:
            self._close_status()
            if self.returncode is None and self.pid is not None:
                self.lost = "the fork server stopped before it reported the worker's exit"
            return True
        self._buffer += chunk
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            message = json.loads(line)
            if "error" in message:
                self._close_status()
                raise ForkServerError(f"the fork server could not fork the cell ({message['error']})")
            if "pid" in message:
                self.pid = int(message["pid"])
            if "returncode" in message:
                self.returncode = int(message["returncode"])
                self._close_status()
                self._close_pidfd()
        return True

    def _close_status(self) -> None:
        if self._status_fd is not None:
            os.close(self._status_fd)
            self._status_fd = None

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def _gone(self) -> bool:
        """Whether the child has exited, for when the server can no longer say so."""
        if self._pidfd is not None:
            return bool(select.select([self._pidfd], [], [], 0)[0])
        try:
            os.kill(self.pid or 0, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return True  # the pid was reused by another user's process
        return False

    def poll(self) -> int | None:
        while self._read_status(0):
            pass
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            if self._status_fd is None:
                # The server died: the child got SIGTERM from the kernel; wait until it is gone.
                if self._gone():
                    self._close_pidfd()
                    return None
                slice_ = 0.1
            else:
                slice_ = 0.2
            if timeout is not None and deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise subprocess.TimeoutExpired(self.args, timeout)
                slice_ = min(slice_, remaining)
            if self._status_fd is not None:
                self._read_status(slice_)
            else:
                time.sleep(slice_)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is not None or self.pid is None:
            return
        try:
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, signum)
            elif not self.lost:
                os.kill(self.pid, signum)
        except ProcessLookupError:
            pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


# --------------------------------------------------------------------------- the server's side


def _send(fd: int, message: dict[str, Any]) -> None:
    try:
        os.write(fd, json.dumps(message).encode("utf-8") + b"\n")
    except OSError:
        pass  # the runner stopped reading: nothing to tell


def server_state() -> dict[str, Any]:
    """What makes forking safe, read from the libraries' own state."""
    torch = sys.modules.get("torch")
    return {
        "cuda_initialized": bool(torch is not None and torch.cuda.is_initialized()),
        "python_threads": threading.active_count(),
        "peft_imported": "peft" in sys.modules,
        "bitsandbytes_imported": "bitsandbytes" in sys.modules,
    }


def _preload(modules: list[str]) -> dict[str, Any]:
    import importlib

    started = time.perf_counter()
    for module in modules:
        importlib.import_module(module)
    state = server_state()
    if state["cuda_initialized"]:
        raise RuntimeError("CUDA was initialised while preloading: a process holding CUDA cannot be forked safely")
    if state["python_threads"] != 1:
        raise RuntimeError(f"{state['python_threads']} Python threads after preloading: a fork would copy them half-way")
    return {**state, "preload_seconds": round(time.perf_counter() - started, 3), "modules": len(sys.modules)}


def serve(channel: socket.socket, preload: list[str]) -> None:
    try:
        state = _preload(preload)
    except BaseException as error:  # noqa: BLE001 - told to the runner, which then starts fresh interpreters
        import traceback

        traceback.print_exc()
        channel.send(json.dumps({"ready": False, "error": f"{type(error).__name__}: {error}"}).encode("utf-8"))
        return
    channel.send(json.dumps({"ready": True, "pid": os.getpid(), **state}).encode("utf-8"))
    print(f"[fork server] preloaded {len(preload)} module(s) in {state['preload_seconds']} s", file=sys.stderr, flush=True)

    children: dict[int, int] = {}  # pid -> its status pipe
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    # SIGCHLD wakes the loop below through this pipe, so an exit is reported at once.
    signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    while True:
        watched: list[socket.socket | int] = [channel, wake_read]
        ready, _, _ = select.select(watched, [], [])
        if wake_read in ready:
            try:
                while os.read(wake_read, 512):
                    pass
            except BlockingIOError:
                pass
        if channel in ready:
            message, fds, _, _ = socket.recv_fds(channel, MESSAGE_BYTES, 3)
            if not message:
                return  # the runner closed its end (or died): children get SIGTERM as we exit
            _fork_child(message, fds, children, inherited=[channel.fileno(), wake_read, wake_write])
        _reap(children)


def _fork_child(message: bytes, fds: list[int], children: dict[int, int], inherited: list[int]) -> None:
    if len(fds) != 3:
        for fd in fds:
            os.close(fd)
        print(f"[fork server] ignored a request with {len(fds)} descriptor(s) instead of 3", file=sys.stderr, flush=True)
        return
    stdout, stderr, status = fds
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        request = json.loads(message)
        pid = os.fork()
    except (OSError, ValueError) as error:
        _send(status, {"error": f"{type(error).__name__}: {error}"})
        for fd in fds:
            os.close(fd)
        return
    if pid == 0:
        _child(request, stdout, stderr, [*inherited, status, *children.values()])
    os.close(stdout)
    os.close(stderr)
    _send(status, {"pid": pid})
    children[pid] = status


def _reap(children: dict[int, int]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        fd = children.pop(pid, None)
        if fd is not None:
            _send(fd, {"returncode": os.waitstatus_to_exitcode(status)})
            os.close(fd)


def _child(request: dict[str, Any], stdout: int, stderr: int, inherited: list[int]) -> None:
    """Become the cell's process, run the entry, and exit with its code; never returns."""
    import atexit

    code: int = 1
    try:
        server = os.getppid()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the server ignores Ctrl-C; a cell stops on it
        for fd in inherited:
            os.close(fd)
        die_with_parent()
        if os.getppid() != server:
            os._exit(1)  # the server died before the line above: nobody would report this child
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(stdout, 1)
        os.dup2(stderr, 2)
        for fd in {devnull, stdout, stderr} - {0, 1, 2}:
            os.close(fd)
        # The server's exit handlers clean up what the server made; this child runs its own only.
        atexit._clear()
        os.environ[FORKED_ENV] = str(server)
        # The cell's own variables (run --allocator's PYTORCH_CUDA_ALLOC_CONF): the server never
        # initialises CUDA, whose allocator reads its settings at first initialisation, so a
        # child that sets them here, before its entry runs, is as a fresh interpreter would be.
        os.environ.update(request.get("env") or {})
        code = _run_entry(request["entry"], list(request["argv"]))
    except KeyboardInterrupt:
        # As CPython ends on an uncaught Ctrl-C: by SIGINT, so the parent sees the signal.
        _flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:  # noqa: BLE001 - printed to the cell's log, as an interpreter would
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            atexit._run_exitfuncs()
        finally:
            _flush()
            os._exit(code)


def _run_entry(entry: str, argv: list[str]) -> int:
    import importlib

    module_name, _, function_name = entry.partition(":")
    module = importlib.import_module(module_name)
    sys.argv = [getattr(module, "__file__", None) or module_name, *argv]  # what `python -m MODULE` shows
    try:
        returned = getattr(module, function_name)(argv)
    except SystemExit as exit:
        returned = exit.code
    if returned is None:
        return 0
    if isinstance(returned, int):
        return returned & 0xFF
    print(returned, file=sys.stderr)
    return 1


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def main(argv: list[str] | None = None) -> None:
    # First of all: Ctrl-C at the terminal reaches the whole process group, and must stop
    # the cells (which restore the handler), not the server.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import argparse

    parser = argparse.ArgumentParser(prog=f"python -m {__name__}", description="The runner's fork server (not for direct use).")
    parser.add_argument("--fd", type=int, required=True, help="the server's end of the runner's socket pair")
    parser.add_argument("--preload", default="", help="comma-separated modules to import before serving")
    args = parser.parse_args(argv)
    channel = socket.socket(fileno=args.fd)
    serve(channel, [module for module in args.preload.split(",") if module])


if __name__ == "__main__":
    main()
