"""``python -m pollinate.edge generate|classify|info|verify``: the runner without torch."""

import sys

from pollinate.edge.cli import main

sys.exit(main())
