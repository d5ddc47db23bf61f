"""Where am I running? Device choice and the versions every notebook prints first."""
from __future__ import annotations

import sys
import warnings

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


def describe_runtime() -> dict[str, str]:
    """Print and return package versions and the compute device.

    Warns loudly on a Colab runtime without a GPU: training there takes an hour instead of
    minutes (Runtime > Change runtime type > GPU).
    """
    info = versions()
    device = pick_device()
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
        info["cuda"] = str(torch.version.cuda)
        info["cudnn"] = str(torch.backends.cudnn.version())
    else:
        info["device"] = f"cpu ({torch.get_num_threads()} threads)"
    for key, value in info.items():
        print(f"{key:>8}: {value}")
    if on_colab() and device.type != "cuda":
        warnings.warn(
            "This Colab runtime has NO GPU. Training will be very slow. "
            "Use Runtime > Change runtime type > GPU, then run the notebook again.",
            stacklevel=2,
        )
    return info
