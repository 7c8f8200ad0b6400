"""What the benchmarks ran on, for the first line of their output."""

from __future__ import annotations

import platform

import torch


def device_name(device) -> str:
    """The GPU and CUDA version, or the CPU's model name and torch's thread count."""
    device = str(device)
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"
