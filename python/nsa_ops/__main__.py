"""``python -m nsa_ops``: the command line (see :mod:`nsa_ops.cli`)."""

from .cli import main

raise SystemExit(main())
