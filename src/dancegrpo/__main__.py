"""``python -m dancegrpo``: the ``dancegrpo`` command line."""

import sys

from .cli import main

sys.exit(main())
