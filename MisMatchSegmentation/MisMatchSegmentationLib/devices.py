"""Which compute devices the engine can use: CPU, each CUDA GPU by index with its free memory, Apple MPS.

The probe runs in the engine's Python (a child process), so torch is never imported into Slicer's GUI
process just to fill a combo box, and the answer is the one the engine will see. ``describe`` turns the
probe's answer into the device list and, when no GPU is usable, one sentence that says why.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass

PROBE = r"""
import json, platform
out = {"torch": None, "cuda_build": None, "cuda_available": False, "gpus": [], "mps": False,
       "system": platform.system(), "machine": platform.machine(), "error": None}
try:
    import torch
    out["torch"] = torch.__version__
    out["cuda_build"] = torch.version.cuda
    out["cuda_available"] = bool(torch.cuda.is_available())
    if out["cuda_available"]:
        for n in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(n)
            try:
                free, total = torch.cuda.mem_get_info(n)
            except Exception:
                free, total = None, p.total_memory
            out["gpus"].append({"index": n, "name": p.name, "free": free, "total": total})
    mps = getattr(torch.backends, "mps", None)
    out["mps"] = bool(mps is not None and mps.is_available())
except Exception as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
"""


@dataclass(frozen=True)
class Device:
    id: str        # the engine's --device value
    label: str     # what the combo box shows


def describe(probe: dict) -> tuple[list[Device], str]:
    """Devices (best first; CPU always last) and a message: empty when a GPU is usable, else why not."""
    devices: list[Device] = []
    for gpu in probe.get("gpus") or []:
        free = gpu.get("free")
        memory = (f"{free / 2**30:.1f} of {gpu['total'] / 2**30:.1f} GiB free" if free is not None
                  else f"{gpu['total'] / 2**30:.1f} GiB")
        devices.append(Device(f"cuda:{gpu['index']}", f"GPU {gpu['index']}: {gpu['name']} ({memory})"))
    if probe.get("mps"):
        devices.append(Device("mps", "Apple GPU (MPS)"))
    devices.append(Device("cpu", "CPU"))
    if len(devices) > 1:
        return devices, ""
    if probe.get("torch") is None:
        why = ("PyTorch is not installed yet; it is installed (after you confirm) the first time you train"
               if not probe.get("error") else f"PyTorch could not be loaded ({probe['error']})")
    elif probe.get("system") == "Darwin":
        why = ("this Mac has no usable Apple GPU (MPS needs Apple silicon and macOS 12.3 or later)"
               if probe.get("machine") != "arm64" else "MPS is not available in this PyTorch build")
    elif not probe.get("cuda_build"):
        why = (f"the installed PyTorch {probe['torch']} is a CPU-only build; to use an NVIDIA GPU, reinstall "
               "PyTorch with a CUDA build from the PyTorch extension (PyTorch Utils module)")
    else:
        why = (f"PyTorch {probe['torch']} (CUDA {probe['cuda_build']}) found no NVIDIA GPU: check that the "
               "GPU driver is installed and recent enough for this CUDA version")
    return devices, f"No GPU usable: {why}. Training runs on the CPU (slower)."


def probe_devices(python: str, env: dict | None = None, timeout: float = 120.0) -> dict:
    """Run the probe in ``python`` (the engine's interpreter); a failure is reported, never raised."""
    try:
        done = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, env=env, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"torch": None, "error": f"the device probe did not run ({exc})"}
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"torch": None, "error": f"the device probe failed: {tail}"}
