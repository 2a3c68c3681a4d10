"""Choosing the compute device and the precision."""

from __future__ import annotations

import contextlib

import torch

from .errors import UserError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` (CUDA, then Apple MPS, then CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

    A device that is asked for but not usable is a :class:`UserError` that says why and what to do.
    """
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            built = torch.version.cuda is not None
            why = ("no CUDA GPU or driver was found" if built else
                   "this PyTorch build has no CUDA support (a CPU-only build)")
            raise UserError(f"--device {name}: {why}; use --device cpu, or install a CUDA build of PyTorch")
        index = 0
        if ":" in name:
            try:
                index = int(name.split(":", 1)[1])
            except ValueError:
                raise UserError(f"--device {name}: the GPU index must be a number, e.g. cuda:0") from None
        count = torch.cuda.device_count()
        if not 0 <= index < count:
            raise UserError(f"--device {name}: there are {count} CUDA GPU(s), numbered 0 to {count - 1}")
        return torch.device("cuda", index)
    if name == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise UserError("--device mps: Apple MPS is not available on this machine; use --device cpu")
        return torch.device("mps")
    raise UserError(f"--device {name}: unknown device; use auto, cpu, cuda, cuda:N or mps")


def autocast(device: torch.device, enabled: bool = True):
    """Mixed precision where it pays: float16 autocast on CUDA; nothing elsewhere.

    (bfloat16 autocast on the CPU is only faster on processors with native bf16 instructions; the
    benchmark script measures it, and training keeps float32 on the CPU.)
    """
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{device} ({props.name}, {props.total_memory / 2**30:.1f} GiB)"
    return str(device)


def available_memory(device: torch.device) -> int | None:
    """Bytes a new allocation can still get on ``device``, or None where that is not known.

    CUDA: the free memory the driver reports. CPU: ``MemAvailable`` on Linux (capped by a cgroup v2 memory
    limit), the physical memory on other POSIX systems, the available physical memory on Windows.
    """
    import os
    import sys

    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # noqa: BLE001 - no driver answer: no check
            return None
    if device.type != "cpu":
        return None
    if sys.platform.startswith("linux"):
        available = None
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        available = int(line.split()[1]) * 1024
                        break
        except (OSError, ValueError):
            pass
        try:
            with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
                limit = f.read().strip()
            with open("/sys/fs/cgroup/memory.current", encoding="ascii") as f:
                used = int(f.read().strip())
            if limit != "max":
                left = max(0, int(limit) - used)
                available = left if available is None else min(available, left)
        except (OSError, ValueError):
            pass
        return available
    if sys.platform == "win32":
        try:
            import ctypes

            class MemoryStatus(ctypes.Structure):
                _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong),
                            ("ullTotalPhys", ctypes.c_ulonglong), ("ullAvailPhys", ctypes.c_ulonglong),
                            ("ullTotalPageFile", ctypes.c_ulonglong), ("ullAvailPageFile", ctypes.c_ulonglong),
                            ("ullTotalVirtual", ctypes.c_ulonglong), ("ullAvailVirtual", ctypes.c_ulonglong),
                            ("ullAvailExtendedVirtual", ctypes.c_ulonglong)]

            status = MemoryStatus()
            status.dwLength = ctypes.sizeof(MemoryStatus)
            if ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
                return int(status.ullAvailPhys)
        except (OSError, AttributeError):
            pass
        return None
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, AttributeError):
        return None


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation failure: CUDA's ``OutOfMemoryError`` or the CPU allocator's (Linux, macOS, Windows)."""
    kinds = tuple(k for k in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None),
                              MemoryError) if isinstance(k, type))
    if isinstance(exc, kinds):   # torch.OutOfMemoryError is new in torch 2.5; Slicer's torch may be older
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("can't allocate memory", "not enough memory", "out of memory"))
