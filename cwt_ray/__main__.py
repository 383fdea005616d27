"""`python -m cwt_ray ...` is the `cwt-ray` command (for machines where the package is on
PYTHONPATH but not installed, e.g. a GPU image with wheels unpacked to a folder)."""
import sys

from .cli import main

sys.exit(main())
