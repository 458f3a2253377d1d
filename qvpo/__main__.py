import sys

from qvpo.cli import main

sys.exit(main())
