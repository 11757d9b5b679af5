#!/usr/bin/env bash
# Remove edge-voice-agent installed by install.sh. Idempotent: safe to run twice.
#
#   sudo systemd/uninstall.sh [--purge] [--root DIR] [--no-systemctl]
#
# By default the local data is kept: the state directory /var/lib/edge-voice-agent (outbox not
# yet sent, baselines, decisions, model store) and the config /etc/edge-voice-agent, so a
# reinstall carries on where it stopped. --purge deletes both as well. Review samples (audio,
# /var/lib/edge-voice-agent/samples) are always deleted.
#
# The system user `edge-voice-agent` is kept even with --purge (Debian practice: a uid that is
# reused later could inherit files left on removable media or backups); remove it by hand with
# `userdel edge-voice-agent` if wanted.
#
# Options:
#   --purge          also delete /var/lib/edge-voice-agent and /etc/edge-voice-agent
#   --root DIR       act on files under DIR instead of / (tests, images). Env DESTDIR too.
#   --no-systemctl   do not call systemctl (the service is not stopped)
#   -h, --help       this text
set -euo pipefail

NAME=edge-voice-agent
root="${DESTDIR:-/}"
use_systemctl=1
purge=0

say() { echo "uninstall: $*"; }
die() { echo "uninstall: error: $*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --purge) purge=1; shift ;;
        --root) [ $# -ge 2 ] || die "--root needs a directory"; root="$2"; shift 2 ;;
        --root=*) root="${1#--root=}"; shift ;;
        --no-systemctl) use_systemctl=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done

[ -n "$root" ] || root=/
if [ "$root" != / ]; then
    [ -d "$root" ] || die "--root $root is not a directory"
    root="$(cd "$root" && pwd)"
fi
R="${root%/}"
if [ -z "$R" ] && [ "$(id -u)" -ne 0 ]; then
    die "run as root (sudo), or use --root DIR"
fi

# remove PATH: delete a file or directory tree if present, saying which.
remove() {
    local p="$R$1"
    if [ -e "$p" ] || [ -L "$p" ]; then
        rm -rf -- "$p"
        say "removed $1"
    else
        say "already absent: $1"
    fi
}

unit="/etc/systemd/system/$NAME.service"
if [ "$use_systemctl" = 1 ]; then
    if [ -z "$R" ]; then
        # Stop first so the agent flushes its current window to the outbox (kept unless --purge).
        systemctl disable --now "$NAME.service" 2>/dev/null || true
        say "stopped and disabled $NAME.service"
    elif [ -e "$R$unit" ]; then
        systemctl --root="$root" disable "$NAME.service" || true
    fi
fi

remove "$unit"
# Drop-ins made with `systemctl edit` belong to this unit too.
remove "/etc/systemd/system/$NAME.service.d"
remove "/opt/$NAME"
remove "/etc/sysusers.d/$NAME.conf"
# Review samples are recordings of people: they go with the program, even without --purge.
remove "/var/lib/$NAME/samples"

if [ "$purge" = 1 ]; then
    remove "/var/lib/$NAME"
    remove "/etc/$NAME"
else
    for d in "/var/lib/$NAME" "/etc/$NAME"; do
        [ ! -e "$R$d" ] || say "kept $d (use --purge to delete it)"
    done
fi

if [ "$use_systemctl" = 1 ] && [ -z "$R" ]; then
    systemctl daemon-reload
    systemctl reset-failed "$NAME.service" 2>/dev/null || true
fi
say "done; user $NAME kept (userdel $NAME to remove it)"
