#!/bin/sh
# The test command: set up, then lint, type-check and run every test (unit, mocks, lab and the
# real-boot VMs). With arguments, they go to pytest alone (e.g. `-m realboot`, `-k lab`).
set -eu
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
if [ $# -gt 0 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi

# The real-boot test spends its minutes waiting on emulated VMs, so the rest runs meanwhile,
# each run in a temporary directory of its own.
work=$(mktemp -d "${TMPDIR:-/tmp}/edgecdn-test.XXXXXX")
trap 'rm -rf "$work"' EXIT
.venv/bin/python -m pytest -q -m realboot -p no:cacheprovider --basetemp "$work/realboot" \
  >"$work/realboot.log" 2>&1 &
realboot=$!
status=0
.venv/bin/python -m pytest -q -m "not realboot" -p no:cacheprovider --basetemp "$work/main" || status=$?
realboot_status=0
wait "$realboot" || realboot_status=$?
echo "--- the real-boot test (tests/realboot):"
cat "$work/realboot.log"
[ "$status" -eq 0 ] || exit "$status"
exit "$realboot_status"
