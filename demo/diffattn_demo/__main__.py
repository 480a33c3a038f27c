"""``python -m diffattn_demo`` serves the demo, like ``diffattn demo``."""

import sys

from .app import main

sys.exit(main())
