"""`python -m vpure`: the same command line as the `vpure` console script."""

from vpure.runtime.cli import main

raise SystemExit(main())
