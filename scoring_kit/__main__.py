"""``python -m scoring_kit``: the ``scoring-kit`` command line (:mod:`scoring_kit.cli`)."""

from __future__ import annotations

import sys

from scoring_kit.cli import main

if __name__ == "__main__":
    sys.exit(main())
