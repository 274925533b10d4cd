"""``python -m pam_linkus.daemon`` is ``linkusd``."""

import sys

from pam_linkus.daemon.main import main

sys.exit(main())
