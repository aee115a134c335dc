"""CUDA-only mechanisms, made testable on a CPU: sizes, the memory cap, OOM figures, snapshots."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import make_result

from gputech_bench.config import BenchConfig, apply_overrides
from gputech_bench.errors import ConfigError, SizeError
from gputech_bench.measure.cap import plan_cap
from gputech_bench.measure.cuda import NvmlSampler
from gputech_bench.measure.oom import oom_reason, parse_oom_message
from gputech_bench.measure.snapshot import MemorySnapshot
from gputech_bench.report.frame import build_frame
from gputech_bench.units import parse_size

GIB, MIB = 2**30, 2**20


@pytest.mark.parametrize(
    "text, expected",
    [("24GiB", 24 * GIB), ("24 GiB", 24 * GIB), ("24G", 24 * GIB), ("24", 24 * GIB), ("24GB", 24 * 10**9),
     ("512MiB", 512 * MIB), ("1.5 gib", int(1.5 * GIB)), ("80gb", 80 * 10**9)],
)
def test_sizes_are_read_as_people_write_them(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "24 parsecs", "", "-3GiB", "0GiB"])
def test_unreadable_sizes_are_refused(text):
    with pytest.raises(SizeError):
        parse_size(text)


def test_the_cap_counts_the_cuda_context_against_the_emulated_card():
    cap = plan_cap(limit_bytes=24 * GIB, context_bytes=512 * MIB, device_total_bytes=80 * GIB)
    assert cap.allocator_bytes == 24 * GIB - 512 * MIB
    assert cap.fraction == pytest.approx((24 * 1024 - 512) / (80 * 1024))
    assert cap.describe()["allocator_cap_mib"] == 24 * 1024 - 512


def test_impossible_caps_are_refused():
    with pytest.raises(SizeError, match="more than this GPU has"):
        plan_cap(96 * GIB, 512 * MIB, 80 * GIB)
    with pytest.raises(SizeError, match="leaves nothing after the CUDA context"):
        plan_cap(256 * MIB, 512 * MIB, 80 * GIB)


def test_a_memory_limit_is_a_cuda_setting():
    config = apply_overrides(BenchConfig(), ["gpu_memory_limit=24GiB"])
    assert config.gpu_memory_limit == "24GiB"
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        apply_overrides(BenchConfig(), ["gpu_memory_limit=24GiB", "device=cpu"])
    with pytest.raises(ConfigError, match="cannot read memory size 'lots'"):
        apply_overrides(BenchConfig(), ["gpu_memory_limit=lots"])


# The shape of torch 2.x's message (c10/cuda/CUDACachingAllocator.cpp).
TORCH_OOM = (
    "CUDA out of memory. Tried to allocate 2.29 GiB. GPU 0 has a total capacity of 79.19 GiB of which 55.01 GiB is free. "
    "Including non-PyTorch memory, this process has 24.15 GiB memory in use. Of the allocated memory 21.80 GiB is "
    "allocated by PyTorch, and 1.27 GiB is reserved by PyTorch but unallocated. If reserved but unallocated memory is "
    "large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation."
)


def test_oom_figures_are_read_from_the_message():
    details = parse_oom_message(TORCH_OOM)
    assert details == {
        "requested_mib": 2345.0,
        "device_total_mib": 81090.6,
        "device_free_mib": 56330.2,
        "process_in_use_mib": 24729.6,
        "allocated_by_pytorch_mib": 22323.2,
        "reserved_unallocated_mib": 1300.5,
    }
    assert oom_reason(details, {"limit_mib": 24576.0}) == "out of memory: asked for 2,345 MiB with 24,730 MiB in use (cap 24,576 MiB)"
    assert parse_oom_message("DefaultCPUAllocator: can't allocate memory") == {}
    assert oom_reason({}, None) is None


# torch's message with NVML: every process on the GPU, another's first, ours as "this process".
CROWDED_OOM = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.50 GiB is free. "
    "Process 1234 has 10.00 GiB memory in use. Process 5678 has 20.00 GiB memory in use. Including non-PyTorch memory, "
    "this process has 47.50 GiB memory in use. Of the allocated memory 45.00 GiB is allocated by PyTorch, and 1.00 GiB "
    "is reserved by PyTorch but unallocated."
)


def test_an_oom_takes_this_process_usage_never_another_pid():
    details = parse_oom_message(CROWDED_OOM, pid=4321)
    assert details["process_in_use_mib"] == 47.5 * 1024
    assert details["other_processes_mib"] == {"1234": 10 * 1024.0, "5678": 20 * 1024.0}
    assert oom_reason(details, None) == (
        "out of memory: asked for 2,048 MiB with 48,640 MiB in use, while other processes held 30,720 MiB"
    )


def test_an_oom_message_naming_us_by_pid_is_read_by_our_pid():
    # Without "this process", the line with our own PID is ours, wherever it stands.
    by_pid = CROWDED_OOM.replace("Including non-PyTorch memory, this process", "Process 4321")
    details = parse_oom_message(by_pid, pid=4321)
    assert details["process_in_use_mib"] == 47.5 * 1024
    assert details["other_processes_mib"] == {"1234": 10 * 1024.0, "5678": 20 * 1024.0}
    # A message whose lines are all other processes' has no figure of ours: absent, not borrowed.
    details = parse_oom_message(by_pid, pid=999)
    assert "process_in_use_mib" not in details and set(details["other_processes_mib"]) == {"1234", "5678", "4321"}
    assert "with 46,080 MiB in use" in oom_reason(details, None)  # PyTorch's own allocation instead


# As torch 2.11 wrote it on an H200 while another process (447) held 20 GiB; ours was 445.
H200_OOM = (
    "CUDA out of memory. Tried to allocate 300.00 GiB. GPU 0 has a total capacity of 139.80 GiB of which 118.69 GiB "
    "is free. Process 447 has 20.51 GiB memory in use. Including non-PyTorch memory, this process has 610.00 MiB memory "
    "in use. Of the allocated memory 0 bytes is allocated by PyTorch, and 0 bytes is reserved by PyTorch but unallocated."
)


def test_a_real_oom_message_with_another_process_first_is_read_as_ours():
    details = parse_oom_message(H200_OOM, pid=445)
    assert details["process_in_use_mib"] == 610.0  # not process 447's 20.51 GiB
    assert details["other_processes_mib"] == {"447": 21002.2}
    assert details["allocated_by_pytorch_mib"] == 0.0 and details["reserved_unallocated_mib"] == 0.0


def test_oom_rows_carry_the_request_and_the_cap_into_the_table():
    failed = make_result("baseline", status="oom", device="cuda")
    failed.oom = parse_oom_message(TORCH_OOM)
    failed.memory_cap = {"limit_mib": 24576.0}
    fits = make_result("1+2+3", device="cuda", nvml_process_peak_mib=9000.0)
    fits.memory_cap = {"limit_mib": 24576.0}
    frame, measure = build_frame([failed, fits])
    row = frame.set_index("cell").loc["baseline"]
    assert (row.oom_requested_mib, row.oom_in_use_mib, row.gpu_memory_limit_mib) == (2345.0, 24729.6, 24576.0)
    assert measure.label == "GPU memory (NVML), cap 24.0 GiB"


class FakeCudaMemory:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def _record_memory_history(self, **kwargs):
        self.calls.append(("record", kwargs))

    def _dump_snapshot(self, path):
        self.calls.append(("dump", path))
        Path(path).write_bytes(b"snapshot")


def test_snapshot_records_then_dumps_and_stops(tmp_path: Path):
    memory = FakeCudaMemory()
    snapshot = MemorySnapshot(cuda=type("Cuda", (), {"memory": memory})())
    snapshot.start()
    path = snapshot.dump(tmp_path / "cells" / "1.snapshot.pickle")
    assert path.read_bytes() == b"snapshot"
    assert [call[0] for call in memory.calls] == ["record", "dump", "record"]
    assert memory.calls[-1][1] == {"enabled": None}  # recording stopped
    assert not snapshot.recording


# The command line's refusal of --gpu-memory-limit without CUDA: test_cli.py.


class FakeNvml:
    """A GPU whose device-wide usage the test sets, with or without this process listed."""

    def __init__(self, used_mib: float, own_mib: float | None = None) -> None:
        self.used_mib, self.own_mib = used_mib, own_mib

    def nvmlInit(self):
        pass

    def nvmlDeviceGetMemoryInfo(self, handle):
        return type("Info", (), {"used": int(self.used_mib * MIB)})()

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        if self.own_mib is None:
            return []  # a container's PID namespace hides us
        return [type("Process", (), {"pid": os.getpid(), "usedGpuMemory": int(self.own_mib * MIB)})()]

    nvmlDeviceGetGraphicsRunningProcesses = nvmlDeviceGetComputeRunningProcesses


def test_nvml_falls_back_to_device_usage_minus_the_usage_before_the_cell():
    nvml = FakeNvml(used_mib=1_000)  # another tenant's 1,000 MiB, before the cell
    sampler = NvmlSampler(None, nvml=nvml, handle=0)
    for used in (1_000, 9_000, 23_500, 12_000):
        nvml.used_mib = used
        sampler._sample()
    reading = sampler.stop()
    assert reading.peak_bytes == 22_500 * MIB
    assert reading.method.startswith("NVML device-wide used minus usage before the cell")


def test_nvml_prefers_the_per_process_figure():
    nvml = FakeNvml(used_mib=30_000, own_mib=21_000)
    sampler = NvmlSampler(None, nvml=nvml, handle=0)
    sampler._sample()
    reading = sampler.stop()
    assert reading.peak_bytes == 21_000 * MIB and reading.method.startswith("NVML per-process usedGpuMemory")


def test_nvml_missing_is_recorded_not_fatal():
    class Broken:
        def nvmlInit(self):
            raise OSError("libnvidia-ml.so.1: cannot open shared object file")

    reading = NvmlSampler(None, nvml=Broken(), handle=0).start().stop()
    assert reading.peak_bytes is None and reading.method.startswith("unavailable (OSError: libnvidia-ml.so.1")


def test_a_bitsandbytes_without_kernels_for_the_device_is_one_line():
    from gputech_bench.errors import StrategyError
    from gputech_bench.strategies.adam8bit import probe_kernels

    class NoKernels:
        __version__ = "0.50.2"

        class optim:
            class Adam8bit:
                def __init__(self, params, lr):
                    pass

                def step(self):
                    raise RuntimeError("CUDA Setup failed despite GPU being available.\nmore detail")

    with pytest.raises(StrategyError) as error:
        probe_kernels(NoKernels, torch.device("cpu"))
    message = str(error.value)
    assert "\n" not in message and "cannot step an 8-bit optimizer on cpu (CUDA Setup failed" in message
    import bitsandbytes

    probe_kernels(bitsandbytes, torch.device("cpu"))  # the real CPU kernels pass
