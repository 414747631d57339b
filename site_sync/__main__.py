import sys

from site_sync.cli import main

sys.exit(main())
