"""`python -m assistant` is the `lva` command."""

from assistant.cli import main

raise SystemExit(main())
