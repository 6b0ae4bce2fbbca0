#!/usr/bin/env bash
# Install Triage Node as a systemd service. Idempotent: run it again to upgrade.
#
#   sudo deploy/install.sh
#
# What it does:
#   - creates the system user and group `triagenode`;
#   - creates a virtual environment in /opt/triagenode/venv and installs the node into it
#     (torch 2.13.0 first, so that pip never fetches a multi-GB CUDA build by accident;
#     set TRIAGENODE_TORCH to another requirement on a GPU server);
#   - writes /etc/triagenode/triagenode.toml from deploy/triagenode.example.toml,
#     never overwriting an existing one;
#   - creates /var/lib/triagenode (data, spool, queue database), owned by the service user;
#   - installs /etc/systemd/system/triagenode.service, links /usr/local/bin/triagenode,
#     reloads systemd and enables the unit (start it after editing the config).
#
# TRIAGENODE_ROOT=/some/dir installs below that directory instead of / (for tests and
# image builds); then no user is created, nothing is chowned and systemctl is not called.
# TRIAGENODE_PIP_OPTIONS adds options to the pip install of the node (e.g. --no-index --find-links DIR).
set -euo pipefail

ROOT="${TRIAGENODE_ROOT:-}"
SOURCE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH="${TRIAGENODE_TORCH:-torch==2.13.0}"
USER_NAME=triagenode
OPT="$ROOT/opt/triagenode"
ETC="$ROOT/etc/triagenode"
DATA="$ROOT/var/lib/triagenode"
UNIT_DIR="$ROOT/etc/systemd/system"
BIN_LINK="$ROOT/usr/local/bin/triagenode"

say() { printf 'install: %s\n' "$*"; }

if [[ -z "$ROOT" && $EUID -ne 0 ]]; then
    echo "install: run as root (sudo $0), or set TRIAGENODE_ROOT to install below a directory" >&2
    exit 2
fi

if [[ -z "$ROOT" ]]; then
    if ! getent passwd "$USER_NAME" >/dev/null; then
        useradd --system --user-group --home-dir /var/lib/triagenode --no-create-home \
            --shell /usr/sbin/nologin --comment "Triage Node" "$USER_NAME"
        say "created system user $USER_NAME"
    else
        say "system user $USER_NAME exists"
    fi
fi

mkdir -p "$OPT" "$ETC" "$DATA" "$UNIT_DIR" "$(dirname "$BIN_LINK")"

if [[ ! -x "$OPT/venv/bin/python" ]]; then
    "$PYTHON" -m venv "$OPT/venv"
    say "created virtual environment $OPT/venv"
fi
# shellcheck disable=SC2086
"$OPT/venv/bin/pip" install --quiet --upgrade ${TRIAGENODE_PIP_OPTIONS:-} "$TORCH" "$SOURCE"
say "installed $("$OPT/venv/bin/pip" show triagenode 2>/dev/null | awk '/^Version:/ {print "triagenode " $2}')"
install -m 0644 "$SOURCE/README.md" "$OPT/README.md"
ln -sfn "/opt/triagenode/venv/bin/triagenode" "$BIN_LINK"

if [[ -e "$ETC/triagenode.toml" ]]; then
    say "kept the existing $ETC/triagenode.toml"
else
    install -m 0640 "$SOURCE/deploy/triagenode.example.toml" "$ETC/triagenode.toml"
    say "wrote $ETC/triagenode.toml: set ae_title, allowed_calling_aets and [[destinations]]"
fi

install -m 0644 "$SOURCE/deploy/triagenode.service" "$UNIT_DIR/triagenode.service"
chmod 0750 "$DATA"

if [[ -z "$ROOT" ]]; then
    chown root:"$USER_NAME" "$ETC/triagenode.toml"
    chown "$USER_NAME":"$USER_NAME" "$DATA"
    if [[ -d /run/systemd/system ]]; then
        systemctl daemon-reload
        systemctl enable triagenode.service
        say "enabled triagenode.service; start it with: systemctl start triagenode"
    else
        say "systemd is not running here; the unit is installed but not enabled"
    fi
fi
say "done. Check with: sudo -u $USER_NAME triagenode status"
