"""``python -m pyworker.executor``: one executor process (see :mod:`pyworker.executor.main`)."""

import sys

from pyworker.executor.main import main

sys.exit(main())
