"""``python -m ringtrain`` runs the ``ringtrain`` command."""

import sys

from .cli.main import main

sys.exit(main())
