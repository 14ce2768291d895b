"""``python -m loomwatch``: the same as the ``loomwatch`` console script."""

import sys

from loomwatch.cli import main

sys.exit(main())
