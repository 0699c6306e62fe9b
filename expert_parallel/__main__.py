"""``python -m expert_parallel ...``: the ``expert-parallel`` command."""

import sys

from .apps.cli import main

sys.exit(main())
