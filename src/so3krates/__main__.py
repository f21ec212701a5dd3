"""``python -m so3krates`` runs the command-line interface."""

import sys

from so3krates.cli.main import main

sys.exit(main())
