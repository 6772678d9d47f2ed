"""``python -m pymta``: the same as the ``pymta`` console script."""

import sys

from pymta.cli.main import main

sys.exit(main())
