#!/bin/sh
# Create the virtualenv with anchore-objmig and its test tools.
# psycopg's C extension builds against libpq: install its headers first when
# missing (we run as root on the project's machines; elsewhere use sudo).
set -eu
PYTHON=${1:-python3}
VENV=${2:-.venv}

need_apt=""
command -v pg_config >/dev/null 2>&1 || need_apt="$need_apt libpq-dev"
command -v initdb >/dev/null 2>&1 || [ -x /usr/lib/postgresql/15/bin/initdb ] || need_apt="$need_apt postgresql"
command -v cc >/dev/null 2>&1 || need_apt="$need_apt gcc"
if [ -n "$need_apt" ]; then
    echo "bootstrap: installing$need_apt with apt-get" >&2
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $need_apt >/dev/null
fi

"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip >/dev/null
"$VENV/bin/pip" install -q -e '.[test]'
"$VENV/bin/python" -c 'import psycopg; assert psycopg.pq.__impl__ == "c", psycopg.pq.__impl__' \
    || { echo "bootstrap: psycopg's C extension did not build" >&2; exit 1; }
