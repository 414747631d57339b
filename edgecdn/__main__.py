"""`python -m edgecdn verify|report`: operate a deployed stack (see edgecdn.verify, edgecdn.report)."""

from __future__ import annotations

import sys

from edgecdn.operate import main

sys.exit(main())
