import sys

from edge_tl.cli import main

sys.exit(main())
