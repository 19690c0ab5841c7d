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
        install -D -m 0644 /debs/sipthor-archive.asc /etc/apt/keyrings/sipthor.asc
        # Unsigned, the same packages are refused: apt takes the repository only signed by that key.
        mkdir /tmp/unsigned && cp /debs/repo/Packages* /debs/repo/Release /tmp/unsigned/
        echo 'deb [signed-by=/etc/apt/keyrings/sipthor.asc] file:/tmp/unsigned ./' > /etc/apt/sources.list.d/sipthor.list
        if apt-get update -qq >/tmp/apt-unsigned.log 2>&1; then echo 'apt took an unsigned repository'; exit 1; fi
        grep -q 'is not signed' /tmp/apt-unsigned.log || { cat /tmp/apt-unsigned.log; exit 1; }
        echo 'deb [signed-by=/etc/apt/keyrings/sipthor.asc] file:/debs/repo ./' > /etc/apt/sources.list.d/sipthor.list
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends $deps >/tmp/apt.log 2>&1 || { tail -30 /tmp/apt.log; exit 1; }
        # Installing starts nothing; thor-common made the user and the TLS folder.
        if pgrep -f '^/usr/bin/python3 /usr/bin/(thor-|ngnpro)'; then echo 'a package started a daemon'; exit 1; fi
        getent passwd thor >/dev/null
        test \"\$(stat -c '%a %U:%G' /etc/thor/tls)\" = '750 root:thor'
        python3 -c 'import gevent, cryptography, dns.version; print(\"bookworm stack: gevent\", gevent.__version__, \"cryptography\", cryptography.__version__, \"dnspython\", dns.version.version)'
        (cd /src && bash debian/tests/suite)
        # Removed: the programs and modules are gone, the host's configuration and key stay.
        # Purged: nothing of Thor is left (files, user, group).
        echo '[ThorNetwork]' > /etc/thor/config.ini && echo 'a key' > /etc/thor/tls/node.key
        ours=\$(dpkg-query -W -f='\${Package}\n' 'thor-*' python3-sipthor)
        apt-get remove -y -qq \$ours >/tmp/apt.log 2>&1 || { tail -30 /tmp/apt.log; exit 1; }
        if ls /usr/bin/thor-* /usr/bin/ngnpro /usr/lib/python3/dist-packages/thor 2>/dev/null; then
            echo 'removed packages left programs or modules'; exit 1
        fi
        test -f /etc/thor/config.ini
        test -f /etc/thor/tls/node.key
        apt-get purge -y -qq \$ours >/tmp/apt.log 2>&1 || { tail -30 /tmp/apt.log; exit 1; }
        if dpkg -l 'thor-*' python3-sipthor 2>/dev/null | grep -E '^(ii|rc) '; then echo 'packages not purged'; exit 1; fi
        left=\$(find /etc /usr /var /opt -xdev -path /etc/apt -prune -o \( -name thor -o -name 'thor[-_.]*' -o -name '*sipthor*' -o -name '*ngnpro*' \) -print)
        if [ -n \"\$left\" ] || getent passwd thor || getent group thor; then
            echo \"purged packages left: \$left\"; exit 1
        fi
        echo 'removed and purged: nothing of Thor left'
    "
