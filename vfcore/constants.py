"""Numbers that several stages share, defined once.

* ``PATCH_SIZE``: edge of a stored vertebra patch in voxels (96, at ``PATCH_SPACING`` = 1 mm);
* ``AIR_HU``: the value of air and of everything outside the scan (-1024 HU, the CT scale's floor);
* ``NETWORK_WINDOW_HU``: the HU range the network sees, scaled to [0, 1] (:mod:`vfcore.data`);
* ``DISPLAY_WINDOW_HU``: the window the figures and the explorer show CT in (bone and soft tissue);
* ``DISSECT_SPLIT``, ``SPLIT_TABLE``: the split of held-out vertebrae used only for the
  dissection, and the data root's table that pins patients to a split (phantom and patches).
"""
from __future__ import annotations

PATCH_SIZE: int = 96
PATCH_SPACING: float = 1.0
AIR_HU: int = -1024
NETWORK_WINDOW_HU: tuple[float, float] = (-1000.0, 1000.0)
DISPLAY_WINDOW_HU: tuple[float, float] = (-250.0, 1250.0)
#: Held-out vertebrae used only for the dissection (never for training or model selection).
DISSECT_SPLIT: str = "dissect"
#: An optional table at a data root (``patient<TAB>split``) that pins patients to a split.
SPLIT_TABLE: str = "splits.tsv"
