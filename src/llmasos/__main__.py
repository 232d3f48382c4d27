import sys

from llmasos.cli import main

sys.exit(main())
