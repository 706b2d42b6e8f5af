"""``python -m dreamlab`` runs the command line."""

import sys

from dreamlab.cli import main

sys.exit(main())
