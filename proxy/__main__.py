"""`python -m proxy`: the same command line as `tts-cache-proxy`."""

from proxy.cli import main

raise SystemExit(main())
