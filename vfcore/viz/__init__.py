"""Matplotlib figures shared by the notebooks and the explorer, one file per stage:

``slices`` (CT slices, overlays, contours in mm aspect), ``phantom``, ``patches``,
``training``, ``dissection``.  Import the submodule you need, e.g.
``from vfcore.viz.slices import show_slice``.
"""
