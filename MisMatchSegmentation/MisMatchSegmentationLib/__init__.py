"""Slicer-side helpers of the MisMatch module, one job per file.

- ``engine``: where the packaged engine is, and its ``mismatch/contract.py`` (exit codes, slice lists,
  durations, model-card checks), the one file of the engine the module loads
- ``jobfolder``: MRML nodes -> job-folder files (Slicer storage nodes) and results back into nodes
- ``process``: the engine as a child process, events read as they arrive, cancel of the whole tree
- ``state``: the panel's state machine (plain Python)
- ``logic``: training and segmentation jobs, model files, next uncertain slice
- ``plots``: loss curve and reliability diagrams as table, plot series and plot chart nodes
- ``devices``: CPU, CUDA GPUs with free memory, Apple MPS, and why no GPU is usable
- ``install``: dependencies installed on first use
- ``modelcard``: checking a model folder before it is used or imported
- ``reloading``: the module's Reload reloads this package too
- ``widget``: the panel (the module's Qt widget)

Nothing here but ``widget`` imports Qt, so all the rest runs outside the application with ``slicer-core``.
"""
