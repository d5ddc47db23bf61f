"""vfcore: interpretable vertebral fracture diagnosis (Engstler, Keicher et al. 2022), rebuilt.

One stage per module, in the order the data flows:

    phantom -> verse -> patches -> data -> model -> train -> dissect -> viz / explorer

The notebooks in ``notebooks/`` call these modules; see ``docs/architecture.md``.
"""

__version__ = "0.1.0"
