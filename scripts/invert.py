#!/usr/bin/env python
"""Null-text inversion + Prompt-to-Prompt edits from the command line (see `--help`).

With no arguments: inverts the bundled sample images with the bundled toy model, edits them and
writes everything under ./outputs.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from nti_jax.run.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
