"""The machine and the library versions a benchmark ran on, for the record in bench/RESULTS.md."""

import os
import platform
from importlib import metadata

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    wanted = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")
    return ", ".join(f for f in wanted if f in flags) or "none of " + "/".join(wanted)


def describe(device: torch.device) -> dict[str, str]:
    info = {
        "cpu": f"{cpu_model()}, {os.cpu_count()} cores ({cpu_flags()}), torch threads {torch.get_num_threads()}",
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    versions = [f"python {platform.python_version()}"]
    for package in ("torch", "transformers", "zarr", "numcodecs"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pass
    info["versions"] = ", ".join(versions)
    return info
