import sys

from petlsearch.cli import main

sys.exit(main())
