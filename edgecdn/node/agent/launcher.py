#!/usr/bin/python3 -IB
"""The deploy agent's entry point on a node: sshd's forced command runs this file.

-I ignores PYTHON* variables, the user's site packages and the working directory; -B writes no
bytecode. The agent's modules are installed beside this file, under edgecdn/, and its layout
(the node's paths, ports and names) in layout.json.
"""

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here))
    from edgecdn.contract import LAYOUT_FILE
    from edgecdn.node.agent.protocol import main

    layout = here / LAYOUT_FILE
    sys.exit(main(sys.argv[1:], os.environ, sys.stdin.buffer, sys.stdout, layout_file=layout, stderr=sys.stderr))
