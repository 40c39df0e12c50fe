"""`python -m protobase`: the command line."""

import sys

from protobase.cli.main import main

sys.exit(main())
