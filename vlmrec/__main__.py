import sys

from vlmrec.cli import main

sys.exit(main())
