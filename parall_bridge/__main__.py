"""``python -m parall_bridge``: see :mod:`parall_bridge.cli`."""

import sys

from .cli import main

sys.exit(main())
