#!/usr/bin/env bash
# Install edge-voice-agent as a hardened systemd service on Debian / Raspberry Pi OS.
#
# Idempotent: run it again to upgrade; the existing config is never overwritten, the service is
# restarted only when the package or the unit changed.
#
#   sudo systemd/install.sh [OPTIONS] [SOURCE]
#
# SOURCE is a wheel (edge_voice_agent-*.whl) or a source directory; default: this repository.
#
# Options:
#   --root DIR       place files under DIR instead of / (image building, tests). Implies no apt
#                    and `systemctl --root=DIR enable` only (nothing is started). Env DESTDIR too.
#   --no-systemctl   do not call systemctl at all
#   --no-start       enable the unit but do not start or restart it
#   --no-apt         do not install the Debian packages (libportaudio2, libsndfile1, python3-venv)
#   --no-venv        do not create the venv or pip install (the venv is provisioned elsewhere)
#   --python PY      interpreter for the venv (default: python3)
#   -h, --help       this text
#
# pip honours its own PIP_* environment variables (e.g. PIP_INDEX_URL, PIP_NO_INDEX=1,
# PIP_FIND_LINKS=DIR for an offline install).
#
# Layout: /opt/edge-voice-agent/venv (the program), /etc/edge-voice-agent/config.toml (config),
# /var/lib/edge-voice-agent (state, created by systemd's StateDirectory=),
# /etc/sysusers.d/edge-voice-agent.conf (the system user), and
# /etc/systemd/system/edge-voice-agent.service (the unit).
set -euo pipefail

NAME=edge-voice-agent
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"

root="${DESTDIR:-/}"
use_systemctl=1
start=1
use_apt=1
use_venv=1
python=python3
source=""

say() { echo "install: $*"; }
die() { echo "install: error: $*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --root) [ $# -ge 2 ] || die "--root needs a directory"; root="$2"; shift 2 ;;
        --root=*) root="${1#--root=}"; shift ;;
        --no-systemctl) use_systemctl=0; shift ;;
        --no-start) start=0; shift ;;
        --no-apt) use_apt=0; shift ;;
        --no-venv) use_venv=0; shift ;;
        --python) [ $# -ge 2 ] || die "--python needs an interpreter"; python="$2"; shift 2 ;;
        --python=*) python="${1#--python=}"; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) [ -z "$source" ] || die "only one SOURCE may be given"; source="$1"; shift ;;
    esac
done

[ -n "$root" ] || root=/
if [ "$root" != / ]; then
    mkdir -p "$root"
    root="$(cd "$root" && pwd)"
fi
# R is prepended to absolute paths: empty for the real system, so messages show real paths.
R="${root%/}"
offline=0
[ -z "$R" ] || offline=1

if [ "$offline" = 0 ] && [ "$(id -u)" -ne 0 ]; then
    die "run as root (sudo), or use --root DIR to place the files elsewhere"
fi
source="${source:-$REPO}"
if [ "$use_venv" = 1 ]; then
    [ -e "$source" ] || die "SOURCE $source does not exist (a wheel file or a source directory)"
    source="$(cd "$(dirname "$source")" && pwd)/$(basename "$source")"
fi
for f in "$NAME.service" "$NAME.sysusers" config.example.toml; do
    [ -f "$HERE/$f" ] || die "$HERE/$f is missing; run this script from the repository or sdist"
done

# Files are world-readable unless chosen otherwise: the service user must read the venv.
umask 022
changed=0

# install_file SRC DEST MODE: copy when different; report what happened.
install_file() {
    local src="$1" dest="$2" mode="$3"
    if [ -f "$dest" ] && cmp -s "$src" "$dest"; then
        chmod "$mode" "$dest"
        say "unchanged ${dest#"$R"}"
        return 1
    fi
    mkdir -p "$(dirname "$dest")"
    install -m "$mode" "$src" "$dest"
    say "installed ${dest#"$R"}"
    return 0
}

# 1. Debian packages: PortAudio for sounddevice, libsndfile for soundfile, venv for python3.
if [ "$use_apt" = 1 ] && [ "$offline" = 0 ]; then
    missing=()
    for pkg in libportaudio2 libsndfile1 python3-venv; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        say "apt-get install ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
    else
        say "Debian packages already present"
    fi
elif [ "$use_apt" = 1 ]; then
    say "skipping apt under --root (install libportaudio2 libsndfile1 python3-venv in the image)"
fi

# 2. System user (sysusers.d), before anything is owned by it.
install_file "$HERE/$NAME.sysusers" "$R/etc/sysusers.d/$NAME.conf" 0644 || true
if command -v systemd-sysusers >/dev/null 2>&1; then
    # The file argument is a host path even with --root.
    systemd-sysusers --root="$root" "$R/etc/sysusers.d/$NAME.conf"
    say "system user $NAME present (in group audio)"
else
    die "systemd-sysusers not found; is this a systemd system?"
fi

# 3. The program: a venv under /opt so pip never touches the system Python.
venv="$R/opt/$NAME/venv"
if [ "$use_venv" = 1 ]; then
    if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "" 2>/dev/null; then
        say "venv /opt/$NAME/venv exists"
    else
        say "creating venv /opt/$NAME/venv with $python"
        "$python" -m venv "$venv"
        changed=1
    fi
    say "pip install $source"
    pip_log="$(mktemp)"
    if ! "$venv/bin/python" -m pip install --disable-pip-version-check --upgrade "$source" \
            2>&1 | tee "$pip_log"; then
        rm -f "$pip_log"
        die "pip install of $source failed (see above)"
    fi
    if grep -q "^Successfully installed" "$pip_log"; then changed=1; fi
    rm -f "$pip_log"
    [ -x "$venv/bin/$NAME" ] || die "pip install did not provide $venv/bin/$NAME"
else
    say "skipping venv and pip (--no-venv)"
fi
mkdir -p "$R/opt/$NAME"
install_file "$HERE/config.example.toml" "$R/opt/$NAME/config.example.toml" 0644 || true

# 4. Config: only when absent, so local edits survive. Readable by the service's group only:
# it will hold broker credentials.
conf="$R/etc/$NAME/config.toml"
mkdir -p "$R/etc/$NAME"
if [ -e "$conf" ]; then
    say "keeping existing /etc/$NAME/config.toml"
else
    install -m 0640 "$HERE/config.example.toml" "$conf"
    say "installed /etc/$NAME/config.toml (from the example; edit it, then reload)"
fi
if [ "$offline" = 0 ]; then
    chown "root:$NAME" "$conf"
else
    # The user exists in $root's /etc/group, not necessarily on this host: use its gid.
    gid="$(awk -F: -v n="$NAME" '$1 == n { print $3 }' "$R/etc/group" 2>/dev/null || true)"
    [ -z "$gid" ] || chown "0:$gid" "$conf" 2>/dev/null || true
fi

# 5. The unit.
if install_file "$HERE/$NAME.service" "$R/etc/systemd/system/$NAME.service" 0644; then
    changed=1
fi

# 6. systemd.
if [ "$use_systemctl" = 0 ]; then
    say "not calling systemctl (--no-systemctl)"
elif [ "$offline" = 1 ]; then
    systemctl --root="$root" enable "$NAME.service"
    say "enabled $NAME.service under $root (not started)"
else
    systemctl daemon-reload
    systemctl enable "$NAME.service"
    if [ "$start" = 0 ]; then
        say "enabled $NAME.service; not started (--no-start)"
    elif [ "$changed" = 1 ] && systemctl is-active --quiet "$NAME.service"; then
        systemctl restart "$NAME.service"
        say "restarted $NAME.service to pick up the new version"
    else
        systemctl start "$NAME.service"
        say "started $NAME.service; see: systemctl status $NAME, journalctl -u $NAME"
    fi
fi
say "done"
