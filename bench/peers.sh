#!/usr/bin/env bash
# Peers for the side-by-side benchmark (bench/run.sh sources this file): private, throw-away
# instances of Postfix (discard and Maildir delivery), Dovecot (POP3) and smtp-sink, each on a
# loopback high port with its own configuration under a temporary directory. Nothing here touches
# /etc/postfix or /etc/dovecot, listens on port 25 or off loopback, or enables a system service.
#
# Standalone: `bash bench/peers.sh install` installs the Debian packages (root only) and exits.
#
# Functions (all state in PF_*, DV_*, SINK_* variables; the caller's trap calls peers_stop_all):
#   peers_install                    apt-get install postfix dovecot-pop3d if missing
#   free_port                        prints an unused loopback TCP port in 20000..59999
#   tree_ticks PID                   CPU clock ticks of PID and all its descendants
#   pf_start DIR PORT                Postfix: example.test -> discard, vmail.example.test -> Maildir
#   pf_maildir_count                 messages delivered to the Postfix Maildir so far
#   dv_start DIR PORT PASSWORD U...  Dovecot POP3, users U... with Maildirs under DIR/mail/U
#   sink_start PORT                  smtp-sink (accepts and discards, the no-work limit)
#   peers_stop_all                   stops whatever of the above runs

PF_DIR="" PF_PID="" PF_PORT=""
DV_DIR="" DV_PID="" DV_PORT=""
SINK_PID="" SINK_PORT=""
PEER_UID=65534   # nobody: owns the peers' Maildirs (both refuse to deliver as root)
PEER_GID=65534

peers_have() {
    command -v postfix >/dev/null && command -v smtp-source >/dev/null \
        && command -v smtp-sink >/dev/null && command -v dovecot >/dev/null \
        && command -v doveadm >/dev/null && [[ -x /usr/lib/dovecot/pop3 ]]
}

# Installs the peers from Debian packages with no service started (policy-rc.d exits 101) and
# Postfix preseeded to "No configuration", so that the system gets no running or enabled MTA.
peers_install() {
    peers_have && return 0
    if [[ $(id -u) != 0 ]]; then
        echo "peers: postfix/dovecot-pop3d are not installed and this is not root; skipping peers" >&2
        return 1
    fi
    local policy=/usr/sbin/policy-rc.d saved=""
    if [[ -e "$policy" ]]; then
        saved=$(mktemp)
        cp -p "$policy" "$saved"
    fi
    printf '#!/bin/sh\n# bench/peers.sh: no service may start during the install\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    local rc=0
    echo 'postfix postfix/main_mailer_type select No configuration' | debconf-set-selections
    {
        DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -q --no-install-recommends \
            postfix dovecot-core dovecot-pop3d >"${TMPDIR:-/tmp}/bench-peers-apt.log" 2>&1 \
            || { timeout 300 apt-get update -q >/dev/null 2>&1 \
                && DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -q \
                    --no-install-recommends postfix dovecot-core dovecot-pop3d \
                    >"${TMPDIR:-/tmp}/bench-peers-apt.log" 2>&1; }
    } || rc=$?
    if [[ -n "$saved" ]]; then
        cp -p "$saved" "$policy"
        rm -f "$saved"
    else
        rm -f "$policy"
    fi
    if ((rc != 0)) || ! peers_have; then
        echo "peers: apt-get install failed (exit $rc); last lines of ${TMPDIR:-/tmp}/bench-peers-apt.log:" >&2
        tail -n 5 "${TMPDIR:-/tmp}/bench-peers-apt.log" >&2
        return 1
    fi
    return 0
}

# True if something listens on TCP PORT (any address), from /proc/net/tcp{,6}: no ss needed.
port_listening() {
    local h
    h=$(printf ':%04X' "$1")
    cat /proc/net/tcp /proc/net/tcp6 2>/dev/null \
        | awk -v h="$h" '$4 == "0A" && substr($2, length($2) - 4) == h { f = 1 } END { exit !f }'
}

free_port() {
    local p
    for _ in $(seq 1 200); do
        p=$((20000 + RANDOM % 40000))
        if ! port_listening "$p"; then
            echo "$p"
            return 0
        fi
    done
    return 1
}

# utime+stime+cutime+cstime of PID and every live descendant: reaped children are in their
# parent's cutime/cstime, so a short-lived worker's CPU is counted whether it is alive or not.
tree_ticks() {
    local root=$1
    [[ -n "$root" && -e "/proc/$root/stat" ]] || return 0
    { cat /proc/[0-9]*/stat 2>/dev/null || true; } | awk -v root="$root" '
        { pid = $1; s = $0; sub(/^.*\) /, "", s); split(s, f, " ")
          ppid[pid] = f[2]; t[pid] = f[12] + f[13] + f[14] + f[15] }
        END {
            for (p in ppid) {
                q = p; n = 0
                while (q != root && q > 1 && (q in ppid) && n < 64) { q = ppid[q]; n++ }
                if (q == root) sum += t[p]
            }
            printf "%d\n", sum
        }'
}

# Waits up to SECS for TCP PORT on 127.0.0.1 to listen.
wait_listen() {
    local port=$1 secs=$2
    for _ in $(seq 1 $((secs * 10))); do
        port_listening "$port" && return 0
        sleep 0.1
    done
    return 1
}

pf_start() {
    PF_DIR=$1 PF_PORT=$2
    local d=$PF_DIR
    mkdir -p "$d/etc" "$d/queue" "$d/data" "$d/maildirs"
    chown postfix "$d/data"
    chown "$PEER_UID:$PEER_GID" "$d/maildirs"
    cat >"$d/etc/main.cf" <<EOF
# Private benchmark instance (bench/peers.sh). Loopback only, no DNS.
compatibility_level = 3.6
queue_directory = $d/queue
data_directory = $d/data
meta_directory = /etc/postfix
maillog_file = $d/maillog
maillog_file_prefixes = $d
myhostname = peer.example.test
mydomain = example.test
myorigin = \$myhostname
mydestination = example.test
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
# example.test: accept and discard (the accept scenarios).
local_transport = discard:
local_recipient_maps =
alias_maps =
alias_database =
# vmail.example.test: delivered to one Maildir (the end-to-end scenario).
virtual_mailbox_domains = vmail.example.test
virtual_mailbox_base = $d/maildirs
virtual_mailbox_maps = static:box/
virtual_uid_maps = static:$PEER_UID
virtual_gid_maps = static:$PEER_GID
virtual_mailbox_limit = 0
message_size_limit = 64000000
relayhost =
default_transport = error:no outbound mail from the benchmark instance
# No DNS at all.
disable_dns_lookups = yes
smtp_dns_support_level = disabled
smtp_host_lookup = native
lmtp_host_lookup = native
smtpd_peername_lookup = no
biff = no
append_dot_mydomain = no
EOF
    cat >"$d/etc/master.cf" <<EOF
127.0.0.1:$PF_PORT inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
virtual   unix  - n n - - virtual
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
EOF
    # start-fg keeps the master in the foreground: it stays our child, so it is reaped and its
    # (and its workers') CPU is in one process tree.
    postfix -c "$d/etc" start-fg </dev/null >"$d/start.log" 2>&1 &
    PF_PID=$!
    if ! wait_listen "$PF_PORT" 30; then
        echo "peers: Postfix did not listen on 127.0.0.1:$PF_PORT; its logs:" >&2
        tail -n 20 "$d/start.log" "$d/maillog" >&2 2>/dev/null || true
        return 1
    fi
}

pf_maildir_count() {
    { find "$PF_DIR/maildirs/box/new" -maxdepth 1 -type f 2>/dev/null || true; } | wc -l
}

pf_stop() {
    [[ -n "$PF_PID" ]] || return 0
    timeout 30 postfix -c "$PF_DIR/etc" stop </dev/null >/dev/null 2>&1 || true
    for _ in $(seq 1 100); do
        kill -0 "$PF_PID" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$PF_PID" 2>/dev/null; then
        echo "peers: Postfix did not stop; killing its process tree" >&2
        kill_tree "$PF_PID"
    fi
    wait "$PF_PID" 2>/dev/null || true
    PF_PID=""
}

# SIGKILL to PID and its descendants (used only when a polite stop failed).
kill_tree() {
    local root=$1 p kids
    kids=$(ps -o pid= --ppid "$root" 2>/dev/null || true)
    for p in $kids; do kill_tree "$p"; done
    kill -KILL "$root" 2>/dev/null || true
}

dv_start() {
    DV_DIR=$1 DV_PORT=$2
    local pass=$3 d=$1 hash u
    shift 3
    mkdir -p "$d/run" "$d/state" "$d/mail"
    # Dovecot's own default scheme (doveadm pw with no -s), hashed once for every user.
    hash=$(doveadm pw -p "$pass")
    : >"$d/passwd"
    for u in "$@"; do
        echo "$u:$hash:$PEER_UID:$PEER_GID::$d/mail/$u::" >>"$d/passwd"
        mkdir -p "$d/mail/$u"
    done
    chmod 644 "$d/passwd"
    cat >"$d/dovecot.conf" <<EOF
# Private benchmark instance (bench/peers.sh): POP3 only, loopback only, plaintext allowed.
instance_name = postroom-bench-dovecot
base_dir = $d/run
state_dir = $d/state
protocols = pop3
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
log_path = $d/log
mail_location = maildir:~/Maildir
first_valid_uid = 100
default_internal_user = dovecot
default_login_user = dovenull
passdb {
  driver = passwd-file
  args = $d/passwd
}
userdb {
  driver = passwd-file
  args = $d/passwd
}
service pop3-login {
  inet_listener pop3 {
    address = 127.0.0.1
    port = $DV_PORT
  }
  inet_listener pop3s {
    port = 0
  }
}
EOF
    dovecot -F -c "$d/dovecot.conf" </dev/null >"$d/start.log" 2>&1 &
    DV_PID=$!
    if ! wait_listen "$DV_PORT" 30; then
        echo "peers: Dovecot did not listen on 127.0.0.1:$DV_PORT; its logs:" >&2
        tail -n 20 "$d/start.log" "$d/log" >&2 2>/dev/null || true
        return 1
    fi
}

# Gives the Maildirs to the mail uid once they are filled.
dv_chown() { chown -R "$PEER_UID:$PEER_GID" "$DV_DIR/mail"; }

dv_stop() {
    [[ -n "$DV_PID" ]] || return 0
    kill -TERM "$DV_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do
        kill -0 "$DV_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$DV_PID" 2>/dev/null && kill_tree "$DV_PID"
    wait "$DV_PID" 2>/dev/null || true
    DV_PID=""
}

sink_start() {
    SINK_PORT=$1
    # -u: privileges to drop to when started as root.
    smtp-sink -u nobody "127.0.0.1:$SINK_PORT" 1024 </dev/null >/dev/null 2>&1 &
    SINK_PID=$!
    wait_listen "$SINK_PORT" 10
}

sink_stop() {
    [[ -n "$SINK_PID" ]] || return 0
    kill -TERM "$SINK_PID" 2>/dev/null || true
    wait "$SINK_PID" 2>/dev/null || true
    SINK_PID=""
}

peers_stop_all() {
    sink_stop
    pf_stop
    dv_stop
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    set -euo pipefail
    case "${1:-}" in
        install) peers_install ;;
        *) echo "usage: bash bench/peers.sh install   (bench/run.sh sources this file)" >&2; exit 2 ;;
    esac
fi
