"""The benchmark's building blocks that do not depend on training.

- :mod:`.phantom`: the SYNTHETIC vessel phantom (``vessel_phantom``).
- :mod:`.classical`: Slicer's Segment Editor effects *Fill between slices* and *Grow from seeds* from
  ``slicer-core``, run in a child process (``run_in_subprocess``).
- :mod:`.datasets`: named data sets (``load_dataset``) and the labelled / unlabelled / test slice draw
  (``draw_split``).
- :mod:`.stats`, :mod:`.tables`: Mann-Whitney p-values and the Markdown table shaped like the paper's Table 1
  (``results_table``; the run schema is documented in :mod:`.tables`).

Submodules are imported on demand (``classical`` must stay importable without loading slicer-core).
"""
