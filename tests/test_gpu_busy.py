"""The idle-GPU check before a CUDA matrix, on a fake NVML: reserve, processes, which GPUs."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest
import typer
from typer.testing import CliRunner

import gputech_bench.api._run as api_run
from gputech_bench.api import Output
from gputech_bench.api._setup import check_gpu_idle
from gputech_bench.cli import app
from gputech_bench.errors import DeviceError
from gputech_bench.measure import gpu_busy
from gputech_bench.measure.gpu_busy import idle_check

MIB = 2**20
H200_MIB = 143_771.0


@dataclass
class FakeGpu:
    used_mib: float = 4.0  # net of the reserve: what nvidia-smi shows on an idle card
    reserved_mib: float = 1_311.0  # the driver's own, before any process runs
    total_mib: float = H200_MIB
    processes: dict[int, float | None] = field(default_factory=dict)  # pid -> usedGpuMemory MiB
    uuid: str = ""
    name: str = "NVIDIA H200"


class FakeNvml:
    """Just enough of pynvml for the idle check, v2 memory info included.

    ``used_includes_reserve`` picks the reading of v2's "used" (NVML's documentation has
    said both); ``v1_only`` is an older binding whose nvmlDeviceGetMemoryInfo has no
    version argument, so its "used" holds the reserve."""

    nvmlMemory_v2 = 0x02000028

    def __init__(self, gpus: list[FakeGpu], used_includes_reserve: bool = False, v1_only: bool = False) -> None:
        self.gpus, self.used_includes_reserve, self.v1_only = gpus, used_includes_reserve, v1_only
        for index, gpu in enumerate(gpus):
            gpu.uuid = gpu.uuid or f"GPU-{index:08x}-aaaa-bbbb-cccc-dddddddddddd"
        self.asked: set[int] = set()  # GPUs whose memory was read

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetName(self, handle):
        return self.gpus[handle].name.encode()

    def nvmlDeviceGetUUID(self, handle):
        return self.gpus[handle].uuid

    def nvmlDeviceGetMemoryInfo(self, handle, version=None):
        self.asked.add(handle)
        gpu = self.gpus[handle]
        held = gpu.used_mib + sum(mib or 0.0 for mib in gpu.processes.values())
        if version is None or self.v1_only:
            if version is not None:
                raise TypeError("nvmlDeviceGetMemoryInfo() got an unexpected keyword argument 'version'")
            used = held + gpu.reserved_mib
            return type("Memory", (), {"total": gpu.total_mib * MIB, "free": (gpu.total_mib - used) * MIB, "used": used * MIB})()
        used = held + (gpu.reserved_mib if self.used_includes_reserve else 0.0)
        free = gpu.total_mib - held - gpu.reserved_mib
        return type("Memory_v2", (), {"version": version, "total": gpu.total_mib * MIB, "reserved": gpu.reserved_mib * MIB,
                                      "free": free * MIB, "used": used * MIB})()

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return [type("Process", (), {"pid": pid, "usedGpuMemory": None if mib is None else int(mib * MIB)})()
                for pid, mib in self.gpus[handle].processes.items()]


NOTHING_INHERITED: dict[str, str] = {}


def test_an_idle_h200_as_nvml_reported_it_is_idle():
    # Read on an idle H200 (driver 580): v1 used 615 MiB, v2 reserved 615 MiB and used 0.
    nvml = FakeNvml([FakeGpu(used_mib=0.0, reserved_mib=615.0)])
    assert idle_check(nvml=nvml, environ=NOTHING_INHERITED) == gpu_busy.IdleCheck()
    # A CUDA context (612 MiB there) that NVML does not list is still caught by memory.
    [busy] = idle_check(nvml=FakeNvml([FakeGpu(used_mib=612.0, reserved_mib=615.0)]), environ=NOTHING_INHERITED).busy
    assert busy.describe() == "GPU 0 (NVIDIA H200): no other process listed, 612 MiB used net of a 615 MiB driver reserve"


@pytest.mark.parametrize("used_includes_reserve", [False, True])
def test_an_idle_card_with_a_large_driver_reserve_is_idle(used_includes_reserve):
    # 1,311 MiB of reserve plus a few MiB: over the old fixed 1 GiB, yet nobody uses the card.
    nvml = FakeNvml([FakeGpu()], used_includes_reserve=used_includes_reserve)
    assert idle_check(nvml=nvml, environ=NOTHING_INHERITED) == gpu_busy.IdleCheck()
    nvml = FakeNvml([FakeGpu(used_mib=2_000.0)], used_includes_reserve=used_includes_reserve)
    [busy] = idle_check(nvml=nvml, environ=NOTHING_INHERITED).busy  # a process NVML does not list
    assert busy.used_mib == pytest.approx(2_000.0) and busy.reserved_mib == pytest.approx(1_311.0)


def test_another_process_holding_memory_makes_the_card_busy_and_is_named():
    nvml = FakeNvml([FakeGpu(), FakeGpu(processes={4242: 20_000.0, 5151: None})])
    [busy] = idle_check(nvml=nvml, environ=NOTHING_INHERITED).busy
    assert busy.index == 1 and [process.pid for process in busy.processes] == [4242, 5151]
    assert busy.describe() == (
        "GPU 1 (NVIDIA H200): PID 4242 (20,000 MiB), PID 5151 (? MiB) running, "
        "20,004 MiB used net of a 1,311 MiB driver reserve"
    )


def test_this_process_is_not_counted_as_another():
    own = os.getpid()
    nvml = FakeNvml([FakeGpu(processes={own: 600.0})])
    assert idle_check(nvml=nvml, environ=NOTHING_INHERITED).busy == []
    nvml = FakeNvml([FakeGpu(processes={own: 600.0, 4242: 300.0})])
    [busy] = idle_check(nvml=nvml, environ=NOTHING_INHERITED).busy
    assert [process.pid for process in busy.processes] == [4242]
    assert busy.describe().endswith("304 MiB used net of a 1,311 MiB driver reserve and this process's 600 MiB")


def four_gpus_with_0_and_2_busy() -> FakeNvml:
    return FakeNvml([FakeGpu(processes={100: 9_000.0}), FakeGpu(), FakeGpu(processes={102: 9_000.0}), FakeGpu()])


def test_only_the_gpus_of_the_run_are_checked():
    nvml = four_gpus_with_0_and_2_busy()
    assert [gpu.index for gpu in idle_check(nvml=nvml, environ=NOTHING_INHERITED).busy] == [0, 2]
    nvml = four_gpus_with_0_and_2_busy()
    assert idle_check("1,3", nvml=nvml, environ=NOTHING_INHERITED).busy == []
    assert nvml.asked == {1, 3}  # the others were not even read
    visible = {"CUDA_VISIBLE_DEVICES": "2,3"}
    assert [gpu.index for gpu in idle_check(nvml=four_gpus_with_0_and_2_busy(), environ=visible).busy] == [2]
    # --gpus counts within the inherited list: --gpus 1 is NVML's GPU 3, --gpus 0 its GPU 2.
    assert idle_check("1", nvml=four_gpus_with_0_and_2_busy(), environ=visible).busy == []
    assert [gpu.index for gpu in idle_check("0", nvml=four_gpus_with_0_and_2_busy(), environ=visible).busy] == [2]


def test_uuids_in_cuda_visible_devices_are_matched_to_nvmls_gpus():
    nvml = four_gpus_with_0_and_2_busy()
    uuid_of_2, uuid_of_3 = nvml.gpus[2].uuid, nvml.gpus[3].uuid
    visible = {"CUDA_VISIBLE_DEVICES": f"{uuid_of_3.upper()},{uuid_of_2[:12]}"}  # CUDA takes a unique prefix too
    assert [gpu.index for gpu in idle_check(nvml=nvml, environ=visible).busy] == [2]
    assert idle_check("0", nvml=four_gpus_with_0_and_2_busy(), environ=visible).busy == []
    check = idle_check(nvml=four_gpus_with_0_and_2_busy(), environ={"CUDA_VISIBLE_DEVICES": "MIG-1234abcd,1"})
    assert check.busy == [] and check.unchecked == ["MIG-1234abcd"]


def test_an_nvml_without_v2_memory_info_still_judges_and_says_the_reserve_stayed_in():
    # 1,315 MiB "used" on an idle H200 is its reserve: still idle under v1's limit (1% of the card).
    assert idle_check(nvml=FakeNvml([FakeGpu()], v1_only=True), environ=NOTHING_INHERITED).busy == []
    [busy] = idle_check(nvml=FakeNvml([FakeGpu(used_mib=3_000.0)], v1_only=True), environ=NOTHING_INHERITED).busy
    assert busy.reserved_mib is None
    assert busy.describe() == (
        "GPU 0 (NVIDIA H200): no other process listed, 4,311 MiB used "
        "(the driver's reserve could not be subtracted: NVML has no v2 memory info here)"
    )
    [busy] = idle_check(nvml=FakeNvml([FakeGpu(processes={4242: 500.0})], v1_only=True), environ=NOTHING_INHERITED).busy
    assert [process.pid for process in busy.processes] == [4242]


def test_without_nvml_nothing_is_judged():
    class Missing:
        def nvmlInit(self):
            raise OSError("libnvidia-ml.so.1: cannot open shared object file")

    assert idle_check(nvml=Missing(), environ=NOTHING_INHERITED) == gpu_busy.IdleCheck()


def test_a_busy_gpu_stops_the_run_in_one_line_naming_pids_and_mib(monkeypatch, capsys):
    real_idle_check = gpu_busy.idle_check
    nvml = FakeNvml([FakeGpu(processes={4242: 20_000.0}), FakeGpu(processes={5151: 9_000.0})])
    monkeypatch.setattr(gpu_busy, "idle_check", lambda gpus: real_idle_check(gpus, nvml=nvml, environ=NOTHING_INHERITED))
    output = Output()
    with pytest.raises(DeviceError) as stopped:
        check_gpu_idle(allow_busy=False, gpus="1", output=output)
    err = str(stopped.value)
    assert "\n" not in err  # one line, shown as the command's 'error:' line (exit 2) or as a notebook's
    assert "GPU 1 (NVIDIA H200): PID 5151 (9,000 MiB) running, 9,004 MiB used net of a 1,311 MiB driver reserve" in err
    assert "4242" not in err  # GPU 0 is not this run's
    assert "--allow-busy-gpu" in err
    check_gpu_idle(allow_busy=True, gpus="1", output=output)  # warns and goes on
    assert "warning" in capsys.readouterr().err
    check_gpu_idle(allow_busy=False, gpus="2", output=output)  # NVML lists no GPU 2: a warning, not a refusal
    assert "NVML lists no GPU '2'" in capsys.readouterr().err


def test_the_run_command_checks_the_gpus_it_was_given(monkeypatch, tmp_path):
    checked: list[tuple[bool, str | None]] = []

    def check_and_stop(allow_busy: bool, gpus: str | None, output: Output) -> None:
        checked.append((allow_busy, gpus))
        raise typer.Exit(7)  # stop before any cell runs

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(api_run, "uses_cuda", lambda config: True)
    monkeypatch.setattr(api_run, "check_gpu_idle", check_and_stop)
    out = CliRunner().invoke(app, ["run", "--preset", "cpu", "--strategies", "1", "--gpus", "0,1",
                                       "--results", str(tmp_path / "r")])
    assert out.exit_code == 7, out.output
    assert checked == [(False, "0,1")]
