import sys

from mtt.cli import main

sys.exit(main())
