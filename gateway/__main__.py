"""`python -m gateway` is `agent-gateway`."""

import sys

from .cli import main

sys.exit(main())
