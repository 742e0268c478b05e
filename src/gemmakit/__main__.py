"""``python -m gemmakit``: the same as the ``gemmakit`` command."""

import sys

from .cli import main

sys.exit(main())
