"""Run the module's self-test (``MisMatchSegmentationTest``, every test method) inside 3D Slicer and exit with
its outcome. Used by .github/workflows/slicer-tests.yml:

    Slicer --no-splash --no-main-window --testing --additional-module-paths <checkout>/MisMatchSegmentation \\
        --python-script <checkout>/Testing/slicer/run_in_slicer.py

Not a pytest file (pytest collects ``test_*.py`` only); it runs in Slicer's Python, never outside it.
"""

import sys
import unittest

import slicer

try:
    import MisMatchSegmentation
except ImportError as exc:  # e.g. a Slicer older than 5.10: the module's own one-line reason
    print(f"MisMatch Segmentation cannot be loaded: {exc}", file=sys.stderr)
    slicer.util.exit(1)
else:
    suite = unittest.TestLoader().loadTestsFromTestCase(MisMatchSegmentation.MisMatchSegmentationTest)
    result = unittest.TextTestRunner(stream=sys.stdout, verbosity=2).run(suite)
    slicer.util.exit(0 if result.wasSuccessful() else 1)
