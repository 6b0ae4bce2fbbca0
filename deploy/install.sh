#!/usr/bin/env bash
# Install Triage Node as a systemd service. Idempotent: run it again to upgrade.
#
#   sudo deploy/install.sh
#
# What it does:
#   - creates the system user and group `triagenode`;
#   - creates a virtual environment in /opt/triagenode/venv; installs torch 2.13.0 into it with
#     deploy/torch-install.sh (TRIAGENODE_TORCH=auto, the default: the CUDA build when
#     `nvidia-smi -L` lists an NVIDIA GPU, else the CPU build; =cpu, =cuda or =none to choose),
#     then the node;
#   - writes /etc/triagenode/triagenode.toml from deploy/triagenode.example.toml,
#     never overwriting an existing one;
#   - creates /var/lib/triagenode (data, spool, reports, queue database), owned by the service user;
#   - installs /etc/systemd/system/triagenode.service, /etc/sysusers.d/triagenode.conf and
#     /etc/tmpfiles.d/triagenode.conf (the user, the data directory and the config's group,
#     declared for systemd), links /usr/local/bin/triagenode, reloads systemd and enables the
#     unit (start it after editing the config).
#
# TRIAGENODE_PIP_OPTIONS adds options to every pip install (torch's and the node's), e.g.
# "--no-index --find-links /media/wheels" on a server without internet.
#
# TRIAGENODE_ROOT=/some/dir installs below that directory instead of / (an image's root
# filesystem, or a scratch tree for tests). Then no user is created, nothing is chowned and
# systemctl is not called: at the image's first boot systemd creates the user
# (sysusers.d) and gives it the data directory and the config (tmpfiles.d); enable the unit
# in the image (systemctl --root DIR enable triagenode). The virtual environment is made on
# this host with this host's Python and then rewritten to its final path
# (/opt/triagenode/venv); the image needs the same Python at the same path (the `home` in
# /opt/triagenode/venv/pyvenv.cfg): build on the image's distribution release. Otherwise run
# this script inside the image (chroot, systemd-nspawn, a Dockerfile's RUN) without
# TRIAGENODE_ROOT.
set -euo pipefail

ROOT="${TRIAGENODE_ROOT:-}"
SOURCE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
USER_NAME=triagenode
OPT="$ROOT/opt/triagenode"
ETC="$ROOT/etc/triagenode"
DATA="$ROOT/var/lib/triagenode"
UNIT_DIR="$ROOT/etc/systemd/system"
BIN_LINK="$ROOT/usr/local/bin/triagenode"

say() { printf 'install: %s\n' "$*"; }

case "${TRIAGENODE_TORCH:-auto}" in
    auto | cpu | cuda | none) ;;
    *)
        echo "install: TRIAGENODE_TORCH=${TRIAGENODE_TORCH}: expected auto, cpu, cuda or none" >&2
        exit 2
        ;;
esac

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
"$SOURCE/deploy/torch-install.sh" "$OPT/venv/bin/python" --quiet
# shellcheck disable=SC2086
"$OPT/venv/bin/python" -m pip install --quiet --upgrade ${TRIAGENODE_PIP_OPTIONS:-} "$SOURCE"
if [[ -n "$ROOT" ]]; then
    # The venv names its own path in script shebangs, activate scripts and pyvenv.cfg: make it
    # the path it will have in the image.
    staged="$(printf '%s' "$OPT/venv" | sed 's/[][\\.*^$|]/\\&/g')"
    grep -rlF --null "$OPT/venv" "$OPT/venv/bin" "$OPT/venv/pyvenv.cfg" |
        xargs -0 -r sed -i "s|$staged|/opt/triagenode/venv|g"
    home="$(sed -n 's/^home = //p' "$OPT/venv/pyvenv.cfg")"
    version="$("$OPT/venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    say "rewrote the virtual environment for /opt/triagenode/venv; the image needs Python $version in $home"
    if [[ ! -e "$ROOT$home" ]]; then
        say "warning: $ROOT$home does not exist (yet): install that Python in the image"
    fi
fi
say "installed $("$OPT/venv/bin/python" -m pip show triagenode 2>/dev/null | awk '/^Version:/ {print "triagenode " $2}')"
install -m 0644 "$SOURCE/README.md" "$OPT/README.md"
ln -sfn "/opt/triagenode/venv/bin/triagenode" "$BIN_LINK"

if [[ -e "$ETC/triagenode.toml" ]]; then
    say "kept the existing $ETC/triagenode.toml"
else
    install -m 0640 "$SOURCE/deploy/triagenode.example.toml" "$ETC/triagenode.toml"
    say "wrote $ETC/triagenode.toml: set ae_title, allowed_calling_aets and [[destinations]]"
fi

install -m 0644 "$SOURCE/deploy/triagenode.service" "$UNIT_DIR/triagenode.service"
install -D -m 0644 "$SOURCE/deploy/triagenode.sysusers" "$ROOT/etc/sysusers.d/triagenode.conf"
install -D -m 0644 "$SOURCE/deploy/triagenode.tmpfiles" "$ROOT/etc/tmpfiles.d/triagenode.conf"
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
