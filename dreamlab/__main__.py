import sys

from dreamlab.cli import main

sys.exit(main())
