"""``python -m mismatch`` (also how ``torchrun`` and Slicer's Python start the engine)."""

import sys

from .cli import main

sys.exit(main())
