"""Where am I running? Device choice, the precision policy, and the versions every notebook
prints first."""
from __future__ import annotations

import os
import platform
import sys
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

from .errors import InvalidParameterError
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


#: /proc/cpuinfo flags of a CPU that computes bf16 natively (x86: AVX512-BF16 or AMX; ARM: BF16).
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@dataclass(frozen=True)
class Precision:
    """How the network runs on one device: the autocast ``dtype`` (None: fp32), whether fp16
    training needs a ``GradScaler``, the ``channels_last_3d`` memory layout, and why."""

    dtype: torch.dtype | None
    scaler: bool
    channels_last: bool
    reason: str

    @property
    def name(self) -> str:
        """e.g. ``"bf16 autocast + channels_last_3d"``, ``"fp32"``."""
        kind = {None: "fp32", torch.bfloat16: "bf16 autocast",
                torch.float16: "fp16 autocast + GradScaler"}[self.dtype]
        return kind + (" + channels_last_3d" if self.channels_last else "")


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    return frozenset(line.split(":", 1)[-1].split())


def native_bf16_cpu(flags: frozenset[str] | None = None) -> bool:
    """True when the CPU computes bf16 in hardware (AVX512-BF16 or AMX on x86, BF16 on ARM).

    ``VFCORE_CPU_BF16=0`` (or ``1``) overrides the detection. Without native bf16, oneDNN
    emulates it and a bf16 step is slower than fp32, so the policy keeps fp32 there.
    """
    forced = os.environ.get("VFCORE_CPU_BF16")
    if forced is not None:
        if forced not in ("0", "1"):
            raise InvalidParameterError("VFCORE_CPU_BF16", "0 or 1", forced)
        return forced == "1"
    return bool(NATIVE_BF16_FLAGS & (cpu_flags() if flags is None else flags))


def precision(device: torch.device, *, capability: tuple[int, int] | None = None,
              native_bf16: bool | None = None) -> Precision:
    """The precision and layout policy of training and of predictions (:class:`Precision`).

    * CUDA, compute capability >= 8.0 (A100, H100, L4, RTX 30xx+): bf16 autocast, no scaler;
    * CUDA below 8.0 (the T4 of free Colab, V100): fp16 autocast + GradScaler. (torch's
      ``is_bf16_supported()`` says True on a T4 because bf16 can be emulated, but cuDNN runs
      bf16 convolutions only from 8.0 on, so the policy asks for the capability itself);
    * CPU with native bf16 (:func:`native_bf16_cpu`): bf16 autocast; other CPUs: fp32;
    * ``channels_last_3d`` everywhere: oneDNN and cuDNN run 3D convolutions faster in it
      (``bench/bench_train.py`` prints the four CPU paths side by side).

    ``capability`` / ``native_bf16`` override what the hardware reports (tests, benches).
    The dissection does not follow this policy: it computes its activations in fp32 on every
    device (``amp=False`` in :func:`forward_batches`), so T_k is exact for fp32 activations.
    """
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device) if capability is None else capability
        if tuple(cap) >= (8, 0):
            return Precision(torch.bfloat16, False, True,
                             f"CUDA compute capability {cap[0]}.{cap[1]} >= 8.0: native bf16")
        return Precision(torch.float16, True, True,
                         f"CUDA compute capability {cap[0]}.{cap[1]} < 8.0: no native bf16 "
                         "convolutions, so fp16 with a GradScaler")
    if device.type == "cpu":
        native = native_bf16_cpu() if native_bf16 is None else native_bf16
        if native:
            return Precision(torch.bfloat16, False, True, "CPU with native bf16 (AVX512-BF16/AMX)")
        return Precision(None, False, True, "CPU without native bf16: fp32 (emulated bf16 is slower)")
    return Precision(None, False, False, f"{device.type}: fp32, default layout")


def host_memory_available() -> int | None:
    """Bytes this process can still use: /proc/meminfo's MemAvailable, lowered to what the
    cgroup allows (Binder's 2 GB and docker limits live there; MemAvailable shows the host's).
    None where neither is known (not Linux)."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            cap = Path(limit).read_text().strip()
            if cap != "max" and int(cap) < 2 ** 60:
                found.append(int(cap) - int(Path(usage).read_text().strip()))
        except (OSError, ValueError):
            continue
    return min(found) if found else None


def precision_line(device: torch.device | str | None = None) -> str:
    """What runs where, for benches and logs: training's path and why, and the dissection's."""
    device = pick_device(str(device) if device is not None else None)
    policy = precision(device)
    return (f"precision: training and predictions {policy.name} ({policy.reason}); "
            "dissection fp32, default layout")


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
    """Print and return package versions, the compute device and the precision path training
    takes there (:func:`precision`: which and why).

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
    policy = precision(device)
    info["training"] = f"{policy.name} ({policy.reason})"
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
