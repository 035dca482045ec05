"""``python -m pyworker.cli``: the ``pyworker`` command."""

import sys

from pyworker.cli.main import main

sys.exit(main())
