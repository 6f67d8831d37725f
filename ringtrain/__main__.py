"""``python -m ringtrain`` runs the ``ringtrain`` command."""

import sys

from .cli import main

sys.exit(main())
