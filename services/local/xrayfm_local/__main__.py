"""``python -m xrayfm_local up|down|status`` (``make up`` / ``make down``)."""

import sys

from xrayfm_local.launcher import main

sys.exit(main())
