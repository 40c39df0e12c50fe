"""`python -m protobase.persistence DIR ...`: the persistence process, started by a coordinator."""

import sys

from protobase.persistence.process import main

sys.exit(main())
