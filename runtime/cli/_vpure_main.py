"""`python -m vpure`: installed as vpure/__main__.py by CMakeLists.txt."""

from vpure.runtime.cli import main

raise SystemExit(main())
