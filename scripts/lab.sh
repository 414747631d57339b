#!/bin/sh
# The main job on the local lab: set up, start the nodes, deploy the example site, print a table.
# Extra arguments go to `python -m lab up` (e.g. --nodes 5 --site path/to/site).
set -eu
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python -m lab up "$@"
