#!/usr/bin/env bash
# make deb-test: install the packages from make deb, by name from the build's
# apt repository, in a clean Debian 12 container and run debian/tests (the
# suite against the packaged code, on bookworm's python3-gevent,
# -cryptography and -dnspython).
set -euo pipefail
cd "$(dirname "$0")/../.."
DEBS="${1:-build/deb}"
image=$(bash tests/infra/docker.sh | tail -n 1)
ls "$DEBS"/repo/Packages >/dev/null
# The test dependencies, as debian/tests/control lists them (our packages included).
deps=$(sed -n 's/^Depends: //p' debian/tests/control | tr -d ',')
docker run --rm --init \
    -v "$PWD/$DEBS:/debs:ro" -v "$PWD:/src:ro" \
    -e CI="${CI:-}" \
    "$image" bash -euc "
        export DEBIAN_FRONTEND=noninteractive
        echo 'deb [trusted=yes] file:/debs/repo ./' > /etc/apt/sources.list.d/sipthor.list
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends $deps >/tmp/apt.log 2>&1 || { tail -30 /tmp/apt.log; exit 1; }
        # Installing starts nothing; thor-common made the user and the TLS folder.
        if pgrep -f '^/usr/bin/python3 /usr/bin/(thor-|ngnpro)'; then echo 'a package started a daemon'; exit 1; fi
        getent passwd thor >/dev/null
        test \"\$(stat -c '%a %U:%G' /etc/thor/tls)\" = '750 root:thor'
        python3 -c 'import gevent, cryptography, dns.version; print(\"bookworm stack: gevent\", gevent.__version__, \"cryptography\", cryptography.__version__, \"dnspython\", dns.version.version)'
        cd /src && bash debian/tests/suite
    "
