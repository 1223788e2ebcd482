"""``python -m taemi`` is the ``taemi`` command."""

import sys

from taemi.cli.main import main

sys.exit(main())
