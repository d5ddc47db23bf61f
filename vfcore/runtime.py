"""Where am I running? Device choice and the versions every notebook prints first."""
from __future__ import annotations

import platform
import sys
import warnings
from importlib import metadata
from pathlib import Path

import torch

from .io import versions


def on_colab() -> bool:
    """True inside a Google Colab runtime."""
    return "google.colab" in sys.modules


def pick_device(prefer: str | None = None) -> torch.device:
    """``prefer`` if given, else CUDA when available, else CPU."""
    if prefer:
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device | str | None = None) -> str:
    """The GPU's name, or the CPU model with torch's thread count (what timings are quoted with)."""
    device = pick_device(str(device) if device is not None else None)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")),
                 platform.processor() or "CPU")
    return f"{model} ({torch.get_num_threads()} threads)"


#: Printed by :func:`describe_runtime` beside :func:`vfcore.io.versions`: what draws figures
#: and widgets (their versions change what a student sees, not the results).
DISPLAY_PACKAGES = ("matplotlib", "ipywidgets")


def stale_imports(names) -> dict[str, tuple[str, str]]:
    """{name: (version in use, version installed)} for the modules already imported at another
    version than the one now installed (a pip install in a running kernel): they need a
    restart of the kernel."""
    out = {}
    for name in names:
        module = sys.modules.get(name)
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        loaded = getattr(module, "__version__", None)
        if loaded is not None and str(loaded) != installed:
            out[name] = (str(loaded), installed)
    return out


def describe_runtime() -> dict[str, str]:
    """Print and return package versions and the compute device.

    Warns loudly on a Colab runtime without a GPU: training there takes an hour instead of
    minutes (Runtime > Change runtime type > GPU), and when a package in use is not the version
    installed (the setup cell upgraded it after it was imported: restart the session).
    """
    info = versions()
    for name in DISPLAY_PACKAGES:
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    device = pick_device()
    if device.type == "cuda":
        info["device"] = device_name(device)
        info["cuda"] = str(torch.version.cuda)
        info["cudnn"] = str(torch.backends.cudnn.version())
    else:
        info["device"] = f"cpu: {device_name(device)}"
    for key, value in info.items():
        print(f"{key:>10}: {value}")
    for name, (loaded, installed) in stale_imports(info).items():
        warnings.warn(f"{name} {loaded} is in use but {installed} is installed: restart the "
                      f"session (Runtime > Restart session), then run the notebook again.",
                      stacklevel=2)
    if on_colab() and device.type != "cuda":
        warnings.warn(
            "This Colab runtime has NO GPU. Training will be very slow. "
            "Use Runtime > Change runtime type > GPU, then run the notebook again.",
            stacklevel=2,
        )
    return info
