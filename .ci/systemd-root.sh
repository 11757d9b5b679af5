#!/usr/bin/env bash
# Build, once, what tests/test_real_systemd.py needs to boot the unit under a real systemd:
#   root/    a Debian 12 minbase tree with systemd (debootstrap; the test boots it with
#            systemd-nspawn on a throw-away overlay, so this tree is never changed)
#   wheels/  the project's dependency wheels (pip inside the container cannot reach an index)
#   build/   the wheel build backend, so the test builds the project's wheel offline
# Slow (debootstrap downloads ~100 MB), so it runs in CI with this cache and never inside the
# test budget; without it the test skips, saying how to build it.
#
#   bash .ci/systemd-root.sh [PYTHON]        (PYTHON: default .venv/bin/python)
#
# Cache directory: $EVA_SYSTEMD_CACHE (default /var/cache/eva-systemd). Needs root, debootstrap.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${EVA_SYSTEMD_CACHE:-/var/cache/eva-systemd}"
python="${1:-.venv/bin/python}"
mkdir -p "$cache"
log="$cache/build.log"
: > "$log"

if [ ! -f "$cache/root.ok" ]; then
    # The mirror this machine's apt already uses (no host name is written here).
    mirror="$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' \
        /etc/apt/sources.list.d/*.sources 2>/dev/null || true)"
    [ -n "$mirror" ] || mirror="$(awk '/^deb / && $2 !~ /security/ {print $2; exit}' \
        /etc/apt/sources.list 2>/dev/null || true)"
    [ -n "$mirror" ] || { echo "systemd-root: no Debian mirror found in /etc/apt" >&2; exit 1; }
    rm -rf "$cache/root" "$cache/root.new"
    if ! debootstrap --variant=minbase \
            --include=systemd,systemd-sysv,dbus,python3,python3-venv,libportaudio2,libsndfile1 \
            bookworm "$cache/root.new" "$mirror" >>"$log" 2>&1; then
        tail -n 20 "$log" >&2
        echo "systemd-root: debootstrap failed (full log: $log)" >&2
        exit 1
    fi
    rm -f "$cache/root.new/var/cache/apt/archives/"*.deb
    rm -rf "$cache/root.new/var/lib/apt/lists/"*
    mv "$cache/root.new" "$cache/root"
    touch "$cache/root.ok"
    echo "systemd-root: built $cache/root"
else
    echo "systemd-root: using cached $cache/root"
fi

# Wheels for the container's Python 3.11; the project's own wheel is built by the test from
# the checkout under test. Re-run every time: cheap when pip's cache is warm.
if ! { "$python" -m pip wheel -q --disable-pip-version-check -w "$cache/wheels" . &&
       "$python" -m pip wheel -q --disable-pip-version-check -w "$cache/build" \
           "hatchling>=1.24"; } >>"$log" 2>&1; then
    tail -n 20 "$log" >&2
    echo "systemd-root: building wheels failed (full log: $log)" >&2
    exit 1
fi
rm -f "$cache/wheels"/edge_voice_agent-*.whl
echo "systemd-root: wheels in $cache/wheels"
