"""`python -m cxrlt`: the same as the `cxrlt` command."""

import sys

from cxrlt.cli.main import main

sys.exit(main())
