"""``python -m mil_plugins.cli ...`` is ``mil ...``."""

import sys

from mil_plugins.cli import main

sys.exit(main())
