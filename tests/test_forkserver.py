"""The fork server: what it preloads, what it never touches, and the runner's guarantees for
the cells forked from it (a crash, a timeout, Ctrl-C, a dead server, a server that cannot start).

Most tests boot a server that preloads nothing and run small entries written below, so that
each takes a moment; one boots the real preload and checks the CUDA invariant."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import CommandLauncher, run_request

from gputech_bench.api._run import FORK_SERVER_PRELOAD
from gputech_bench.results import RunFolder
from gputech_bench.run import runner
from gputech_bench.run.forkserver import ForkServer
from gputech_bench.run.launch import Launch
from gputech_bench.run.launcher import (
    ForkedChild,
    FreshInterpreter,
    Torchrun,
    WorkerCall,
    fork_server_suits,
    launcher_for,
)

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or not Path("/proc/self").exists(), reason="Linux fork server")

ENTRIES = '''
import json, os, signal, sys, time

def sleeper(argv):
    print(json.dumps({"event": "phase", "phase": "sleeping", "pid": os.getpid()}), flush=True)
    time.sleep(60)
    open(argv[argv.index("--out") + 1] + ".slept", "w").close()  # only if nobody stopped it first
    return 0

def talk(argv):
    print("to stdout", flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    return int(argv[0])

def leave(argv):
    raise SystemExit(argv[0])

def environ(argv):
    print(json.dumps({name: os.environ.get(name) for name in ("PYTORCH_CUDA_ALLOC_CONF", "GPUTECH_BENCH_ALLOCATOR")}),
          flush=True)
    return 0

STATE = []

def describe(argv):
    import ctypes
    watched = ("torch", "transformers", "gputech_bench.worker.cell", "peft", "bitsandbytes")
    preloaded = sorted(name for name in watched if name in sys.modules)
    pdeathsig = ctypes.c_int(0)
    ctypes.CDLL("libc.so.6").prctl(2, ctypes.byref(pdeathsig))  # PR_GET_PDEATHSIG
    torch = sys.modules.get("torch")
    STATE.append(os.getpid())  # a module global: a second child must not see the first one's
    print(json.dumps({
        "pid": os.getpid(), "ppid": os.getppid(), "preloaded": preloaded, "state": STATE,
        "cuda_initialized": None if torch is None else torch.cuda.is_initialized(),
        "sigint_default": signal.getsignal(signal.SIGINT) is signal.default_int_handler,
        "sigterm_default": signal.getsignal(signal.SIGTERM) is signal.SIG_DFL,
        "pdeathsig": pdeathsig.value, "argv0": sys.argv[0], "argv": sys.argv[1:],
        "stdin": os.readlink("/proc/self/fd/0"), "forked_from": os.environ.get("GPUTECH_BENCH_FORKED_FROM"),
    }), flush=True)
    return 0
'''


@pytest.fixture()
def entries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A module of small entries on the path the server (and its children) import from."""
    folder = tmp_path / "entries"
    folder.mkdir()
    (folder / "forkserver_entries.py").write_text(ENTRIES)
    # Says that the server is preloading (a file beside it), then takes a minute.
    (folder / "slow_preload.py").write_text(
        "import pathlib, time\npathlib.Path(__file__).with_name('importing').touch()\ntime.sleep(60)\n"
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])))
    return folder


@pytest.fixture()
def light_server(tmp_path: Path, entries: Path):
    """A server that preloads only the entries: it boots in a moment."""
    with ForkServer(tmp_path / "fork-server.log", preload=("forkserver_entries",)) as server:
        yield server


def run_folder(tmp_path: Path) -> RunFolder:
    folder = RunFolder(tmp_path / "run")
    folder.root.mkdir()
    return folder


def wait_for_file(path: Path, timeout: float = 120.0) -> None:
    """Until ``path`` exists: what a test waits for before it signals, rather than a guess in seconds."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout:g} s")
        time.sleep(0.02)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_the_server_preloads_the_stack_without_cuda_peft_or_bitsandbytes(tmp_path: Path, entries: Path):
    with ForkServer(tmp_path / "fork-server.log", preload=(*FORK_SERVER_PRELOAD, "forkserver_entries")) as server:
        assert server.start(), server.failure
        hello = server.hello
        # The invariant that makes forking safe, read from torch's own state in the server.
        assert hello["cuda_initialized"] is False and hello["python_threads"] == 1
        assert hello["peft_imported"] is False and hello["bitsandbytes_imported"] is False
        with (tmp_path / "child.log").open("w") as log:
            first = json.loads(server.output("forkserver_entries:describe", ["--cell", "1"], log.fileno()))
            second = json.loads(server.output("forkserver_entries:describe", [], log.fileno()))
    # Each child starts with the stack already imported, and still without CUDA.
    assert first["preloaded"] == ["gputech_bench.worker.cell", "torch", "transformers"]
    assert first["cuda_initialized"] is False
    assert first["ppid"] == hello["pid"] and first["forked_from"] == str(hello["pid"])
    assert first["argv0"].endswith("forkserver_entries.py") and first["argv"] == ["--cell", "1"]
    # A fresh child each time: its own pid, and none of the previous child's state.
    assert second["pid"] != first["pid"] and second["state"] == [second["pid"]]


def test_a_child_has_its_own_streams_signals_and_exit_code(tmp_path: Path, light_server: ForkServer):
    with (tmp_path / "child.log").open("w") as log:
        described = json.loads(light_server.output("forkserver_entries:describe", [], log.fileno()))
        read, write = os.pipe()
        child = light_server.spawn("forkserver_entries:talk", ["3"], write, log.fileno())
        os.close(write)
        with os.fdopen(read) as stdout:
            assert stdout.read() == "to stdout\n"
        assert child.wait(30) == 3
        left = light_server.spawn("forkserver_entries:leave", ["bad input"], log.fileno(), log.fileno())
        assert left.wait(30) == 1
    assert (tmp_path / "child.log").read_text().splitlines()[-2:] == ["to stderr", "bad input"]
    # Ctrl-C stops a cell (the server ignores it); SIGTERM when the server dies; no stdin.
    assert described["sigint_default"] and described["sigterm_default"]
    assert described["pdeathsig"] == signal.SIGTERM and described["stdin"] == os.devnull


def sleeper_worker(server: ForkServer) -> ForkedChild:
    """The forked-child launcher, its worker replaced by an entry that reports its pid and sleeps a minute."""
    launcher = ForkedChild(server)
    launcher.worker_entry = "forkserver_entries:sleeper"
    return launcher


def slept(folder: RunFolder, cell: str) -> bool:
    """Whether the sleeper of ``cell`` slept its whole minute: nobody stopped it."""
    return Path(f"{folder.result_path(cell)}.slept").exists()


def test_a_forked_worker_gets_the_calls_environment_before_its_entry_runs(tmp_path, light_server):
    """run --allocator's PYTORCH_CUDA_ALLOC_CONF reaches a forked cell as it reaches a fresh interpreter:
    set in the child before its entry runs (the server never initialises CUDA, whose allocator reads it)."""
    launcher = ForkedChild(light_server)
    launcher.worker_entry = "forkserver_entries:environ"
    call = WorkerCall("1", tmp_path / "c.json", tmp_path / "1.json", None,
                      {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "GPUTECH_BENCH_ALLOCATOR": "{}"})
    with (tmp_path / "child.log").open("w") as log:
        child = launcher.start(call, None, log)
        assert child.stdout is not None
        seen = json.loads(child.stdout.readline())
        assert child.wait(30) == 0
    assert seen == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "GPUTECH_BENCH_ALLOCATOR": "{}"}
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ or os.environ["PYTORCH_CUDA_ALLOC_CONF"] != "expandable_segments:True"


def test_a_forked_worker_killed_with_sigkill_is_a_crashed_row(tmp_path, light_server):
    launcher = sleeper_worker(light_server)
    pids: list[int] = []

    def kill_it(label, event):
        pids.append(event["pid"])
        os.kill(event["pid"], signal.SIGKILL)

    run = runner.run_worker(runner.Job("1"), run_request(run_folder(tmp_path)), launcher, kill_it)
    assert run.result.status == "crashed" and run.result.reason.startswith("worker killed by SIGKILL")
    assert pids and pids[0] != light_server.pid and not alive(pids[0])


def test_a_forked_worker_past_the_cell_timeout_is_stopped_and_recorded(tmp_path, light_server):
    launcher = sleeper_worker(light_server)
    pids: list[int] = []
    folder = run_folder(tmp_path)
    run = runner.run_worker(runner.Job("1"), run_request(folder, cell_timeout=1.0), launcher,
                            lambda label, event: pids.append(event["pid"]))
    assert run.result.status == "timeout" and run.result.reason.startswith("exceeded --cell-timeout of 1 s")
    assert not alive(pids[0]) and not slept(folder, "1")


def test_ctrl_c_in_another_thread_stops_a_forked_worker_at_once(tmp_path, light_server, ctrl_c_raises):
    launcher = sleeper_worker(light_server)
    pids: list[int] = []

    def ctrl_c_once_it_sleeps(label, event):
        # The worker's first event says it runs; the runner relays events in a thread of its own.
        pids.append(event["pid"])
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)  # not the main thread

    folder = run_folder(tmp_path)
    run = runner.run_worker(runner.Job("1"), run_request(folder), launcher, ctrl_c_once_it_sleeps)
    assert run.interrupted and run.result.status == "interrupted"
    assert not alive(pids[0]) and not slept(folder, "1")  # stopped, not waited for


def test_a_dead_fork_server_takes_its_cells_with_it_and_says_so(tmp_path, light_server):
    launcher = sleeper_worker(light_server)
    pids: list[int] = []

    def kill_the_server(label, event):
        pids.append(event["pid"])
        os.kill(light_server.pid, signal.SIGKILL)

    run = runner.run_worker(runner.Job("1"), run_request(run_folder(tmp_path), cell_timeout=60), launcher, kill_the_server)
    # The kernel sent the child SIGTERM when its server died; nobody is left to say how it ended.
    assert run.result.status == "crashed" and "exit status unknown: the fork server stopped" in run.result.reason
    assert not alive(pids[0])
    # The next cell is not sent to a dead server.
    assert not light_server.start() and "stopped" in light_server.failure


def test_a_server_that_cannot_preload_leaves_the_cells_to_fresh_interpreters(tmp_path):
    script = "import json; print(json.dumps({'event': 'phase', 'phase': 'fresh'}))"
    folder = run_folder(tmp_path)
    events: list[dict] = []
    with ForkServer(tmp_path / "fork-server.log", preload=("no_such_module_for_the_test",)) as server:
        launcher = ForkedChild(server)
        launcher.fallback = CommandLauncher(lambda call: [sys.executable, "-c", script])
        run = runner.run_worker(runner.Job("1"), run_request(folder), launcher, lambda label, event: events.append(event))
        assert not server.start() and "ModuleNotFoundError" in server.failure
    assert events == [{"event": "phase", "phase": "fresh"}]  # the fresh interpreter ran the cell
    assert run.result.status == "crashed" and "exited with code 0 without a result" in run.result.reason
    assert "[runner] fresh interpreter for this cell: the fork server could not preload" in folder.log_path("1").read_text()


def test_ctrl_c_while_the_server_preloads_leaves_no_server_behind(tmp_path: Path, entries: Path, ctrl_c_raises):
    server = ForkServer(tmp_path / "fork-server.log", preload=("slow_preload",))
    importing = entries / "importing"

    def ctrl_c_once_it_imports() -> None:
        wait_for_file(importing)
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)

    threading.Thread(target=ctrl_c_once_it_imports, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        server.start()
    assert server.pid is None  # stopped and reaped, not left importing


def test_only_cpu_cells_in_plain_processes_are_forked(tmp_path: Path):
    assert fork_server_suits(cuda=False, launch=Launch())
    assert not fork_server_suits(cuda=True, launch=Launch())
    assert not fork_server_suits(cuda=False, launch=Launch(nproc_per_node=2))
    log, preload = Path("unused.log"), ("unused",)
    assert type(launcher_for(Launch(), False, log, preload)) is ForkedChild
    assert type(launcher_for(Launch(), True, log, preload)) is FreshInterpreter
    assert type(launcher_for(Launch(nproc_per_node=2), False, log, preload)) is Torchrun
    # A cell pinned to a GPU slot is never forked: the fork server is not even asked.
    fresh = "import json; print(json.dumps({'event': 'phase', 'phase': 'fresh'}))"
    launcher = ForkedChild(ForkServer(tmp_path / "never-started.log", ("no_such_module_for_the_test",)))
    launcher.fallback = CommandLauncher(lambda call: [sys.executable, "-c", fresh])
    folder = run_folder(tmp_path)
    run = runner.run_worker(runner.Job("1"), run_request(folder), launcher, lambda label, event: None, slot=("0",))
    assert launcher.server.pid is None and launcher.server.failure is None
    assert "exited with code 0 without a result" in run.result.reason


@pytest.mark.slow
def test_the_trace_pools_two_back_ends_trace_what_this_process_traces(tmp_path: Path, tiny_config, monkeypatch):
    from gputech_bench.estimator import predict as predict_module
    from gputech_bench.estimator.predict import ForkedTraces, predict, setups_for

    setups = setups_for(["baseline", "2", "1+2+3", "lora"], tiny_config)
    here = predict(setups, tiny_config, jobs=1)
    spawned = predict(setups, tiny_config, jobs=2)  # the spawn back end: a pool of fresh interpreters
    monkeypatch.setattr(predict_module, "ProcessPoolExecutor", None)  # no pool of fresh interpreters to fall back on
    done: list[str] = []
    with ForkServer(tmp_path / "fork-server.log", FORK_SERVER_PRELOAD) as server:
        forked = predict(setups, tiny_config, jobs=2, on_done=lambda p: done.append(p.setup.label),
                         forked=ForkedTraces(server, tmp_path / "estimate.log"))
        assert server.failure is None
    assert [p.setup for p in forked] == [p.setup for p in spawned] == setups
    assert sorted(done) == sorted(setup.label for setup in setups)
    for back_end in (spawned, forked):
        for ours, theirs in zip(back_end, here):
            assert (ours.device, ours.host, ours.facts, ours.error) == (theirs.device, theirs.host, theirs.facts, theirs.error)
