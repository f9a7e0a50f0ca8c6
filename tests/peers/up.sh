#!/usr/bin/env bash
# Starts real dovecot (IMAP, LMTP, SASL), postfix (submission), Radicale (CalDAV) and
# oidc-provider (OAuth 2) on loopback under DIR, all over TLS with a throwaway CA at DIR/pki/ca.pem
# (DESIGN.md §4). Installs nothing: run install.sh first. ACCESS_TTL shortens OAuth access tokens.
#
# Ports: each one the environment names (IMAPS_PORT, IMAP_PORT, LMTP_PORT, AUTH_PORT,
# SUBMISSION_PORT, SMTPS_PORT, CALDAV_PORT, OAUTH_PORT), the others a block of free loopback
# ports picked at random in 10000-19999: below the kernel's ephemeral range (where port-0 binds
# and outgoing connections land) and the test daemons' HTTP ports (20000 and up), so that only
# another suite's peers could take one, and a block makes that rare. They are written to
# DIR/ports.env (NAME=port lines), which the tests read and a shell can source; so two checkouts
# (two DIRs) run side by side.
set -euo pipefail
DIR=$(mkdir -p "${1:?usage: up.sh DIR}" && cd "$1" && pwd)
KIT=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$KIT/../.." && pwd)
DEPS=${PEERS_DEPS:-$REPO/target/peer-deps}
log() { echo "peers: $*" >&2; }

answers() { (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null; }

# A block of 8 consecutive ports none of which answers on loopback: its first port.
free_block() {
  local base p
  for _ in $(seq 1 100); do
    base=$((10000 + (${SRANDOM:-$RANDOM} % 1250) * 8))
    for p in $(seq "$base" $((base + 7))); do answers "$p" && continue 2; done
    echo "$base"; return 0
  done
  log "no free block of ports in 10000-19999"; return 1
}

pick_ports() {
  local base; base=$(free_block)
  IMAPS=${IMAPS_PORT:-$base} IMAP=${IMAP_PORT:-$((base + 1))} LMTP=${LMTP_PORT:-$((base + 2))}
  AUTH=${AUTH_PORT:-$((base + 3))} SUB=${SUBMISSION_PORT:-$((base + 4))} SMTPS=${SMTPS_PORT:-$((base + 5))}
  DAV=${CALDAV_PORT:-$((base + 6))} AS=${OAUTH_PORT:-$((base + 7))}
  printf '%s\n' "IMAPS_PORT=$IMAPS" "IMAP_PORT=$IMAP" "LMTP_PORT=$LMTP" "AUTH_PORT=$AUTH" \
    "SUBMISSION_PORT=$SUB" "SMTPS_PORT=$SMTPS" "CALDAV_PORT=$DAV" "OAUTH_PORT=$AS" > "$DIR/ports.env.new"
  mv "$DIR/ports.env.new" "$DIR/ports.env"
}

check_installed() {
  local missing=()
  command -v dovecot >/dev/null || missing+=(dovecot)
  command -v postfix >/dev/null || missing+=(postfix)
  command -v openssl >/dev/null || missing+=(openssl)
  command -v node >/dev/null || missing+=(node)
  [ -x "$DEPS/venv/bin/radicale" ] || missing+=(radicale)
  [ -d "$DEPS/oauth/node_modules/oidc-provider" ] || missing+=(oidc-provider)
  if [ ${#missing[@]} -gt 0 ]; then
    log "missing: ${missing[*]}; install them with: sudo bash $KIT/install.sh"
    exit 3
  fi
}

make_pki() {
  local p=$DIR/pki; mkdir -p "$p"; [ -f "$p/leaf-chain.pem" ] && return
  openssl ecparam -name prime256v1 -genkey -noout -out "$p/ca.key"
  openssl req -x509 -new -key "$p/ca.key" -subj "/CN=peers test CA" -days 30 -out "$p/ca.pem" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
  openssl ecparam -name prime256v1 -genkey -noout -out "$p/leaf.key"
  openssl req -new -key "$p/leaf.key" -subj "/CN=localhost" -out "$p/leaf.csr"
  printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n' > "$p/leaf.ext"
  openssl x509 -req -in "$p/leaf.csr" -CA "$p/ca.pem" -CAkey "$p/ca.key" -CAcreateserial -days 30 -extfile "$p/leaf.ext" -out "$p/leaf.pem" 2>/dev/null
  cat "$p/leaf.pem" "$p/ca.pem" > "$p/leaf-chain.pem"
  chmod 644 "$p"/*.pem "$p/leaf.key"
}

start_dovecot() {
  local d=$DIR/dovecot; mkdir -p "$d/run" "$d/state" "$d/mail"; chown nobody:nogroup "$d/mail"
  printf 'alice@x.test:{PLAIN}secret1::::::\nbob@x.test:{PLAIN}secret2::::::\n' > "$d/passwd"
  # XOAUTH2/OAUTHBEARER: the token is checked by introspection at the kit's OAuth server; its
  # subject (alice) must match the local part of the user named in the SASL exchange.
  cat > "$d/oauth2.conf.ext" <<CONF
introspection_mode = post
introspection_url = https://broker:brokersecret@127.0.0.1:$AS/token/introspection
tls_ca_cert_file = $DIR/pki/ca.pem
username_attribute = sub
username_format = %Ln
active_attribute = active
active_value = true
CONF
  cat > "$d/dovecot.conf" <<CONF
base_dir = $d/run
state_dir = $d/state
log_path = $d/dovecot.log
instance_name = peers-$(basename "$DIR")
protocols = imap lmtp
listen = 127.0.0.1
ssl = yes
ssl_cert = <$DIR/pki/leaf-chain.pem
ssl_key = <$DIR/pki/leaf.key
disable_plaintext_auth = no
auth_mechanisms = plain login xoauth2 oauthbearer
mail_location = maildir:$d/mail/%u
passdb {
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = $d/oauth2.conf.ext
}
passdb {
  driver = passwd-file
  mechanisms = plain login none
  args = scheme=PLAIN username_format=%u $d/passwd
}
userdb {
  driver = static
  args = uid=nobody gid=nogroup home=$d/mail/%u
}
service imap-login {
  inet_listener imap {
    port = $IMAP
  }
  inet_listener imaps {
    port = $IMAPS
    ssl = yes
  }
}
service lmtp {
  inet_listener lmtp {
    address = 127.0.0.1
    port = $LMTP
  }
  unix_listener lmtp {
    mode = 0
  }
}
service auth {
  inet_listener {
    address = 127.0.0.1
    port = $AUTH
  }
}
CONF
  dovecot -c "$d/dovecot.conf" </dev/null >"$d/start.log" 2>&1 || { cat "$d/start.log" >&2; return 1; }
}

start_postfix() {
  local p=$DIR/postfix; mkdir -p "$p/etc" "$p/spool" "$p/data"; chown postfix "$p/data"
  cat > "$p/etc/main.cf" <<CONF
compatibility_level = 3.6
queue_directory = $p/spool
data_directory = $p/data
mail_owner = postfix
myhostname = localhost
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
alias_maps =
alias_database =
local_recipient_maps =
virtual_mailbox_domains = x.test
virtual_transport = lmtp:inet:127.0.0.1:$LMTP
lmtp_destination_recipient_limit = 1
maillog_file = $p/maillog
maillog_file_prefixes = $DIR
smtpd_tls_cert_file = $DIR/pki/leaf-chain.pem
smtpd_tls_key_file = $DIR/pki/leaf.key
smtpd_tls_security_level = may
smtpd_tls_auth_only = yes
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = dovecot
smtpd_sasl_path = inet:127.0.0.1:$AUTH
smtpd_relay_restrictions = permit_sasl_authenticated, reject
smtpd_recipient_restrictions = permit_sasl_authenticated, reject
CONF
  cat > "$p/etc/master.cf" <<CONF
127.0.0.1:$SUB inet n - n - - smtpd
  -o smtpd_tls_security_level=encrypt
127.0.0.1:$SMTPS inet n - n - - smtpd
  -o smtpd_tls_wrappermode=yes
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
CONF
  postfix -c "$p/etc" start </dev/null >"$p/start.log" 2>&1 || { cat "$p/maillog" >&2 2>/dev/null; return 1; }
}

start_radicale() {
  local r=$DIR/radicale; mkdir -p "$r/collections"
  printf 'alice:secret1\nbob:secret2\n' > "$r/users"
  cat > "$r/config" <<CONF
[server]
hosts = 127.0.0.1:$DAV
ssl = True
certificate = $DIR/pki/leaf-chain.pem
key = $DIR/pki/leaf.key
[auth]
type = htpasswd
htpasswd_filename = $r/users
htpasswd_encryption = plain
[storage]
filesystem_folder = $r/collections
[rights]
type = owner_only
CONF
  setsid sh -c 'echo $$ > "$1"; exec "$2" -m radicale --config "$3"' _ "$r/radicale.pid" "$DEPS/venv/bin/python" "$r/config" \
    </dev/null >"$r/radicale.log" 2>&1 &
}

start_oauth() {
  local o=$DIR/oauth; mkdir -p "$o"
  cp "$KIT/oauth-server.mjs" "$o/server.mjs"
  ln -sfn "$DEPS/oauth/node_modules" "$o/node_modules"
  PORT=$AS TLS_CERT=$DIR/pki/leaf-chain.pem TLS_KEY=$DIR/pki/leaf.key \
    setsid sh -c 'cd "$1" && echo $$ > server.pid && exec node server.mjs' _ "$o" </dev/null >"$o/server.log" 2>&1 &
}

wait_port() { for _ in $(seq 1 100); do answers "$1" && return 0; sleep 0.1; done; log "port $1 ($2) did not open"; return 1; }

check_installed
pick_ports
make_pki
start_dovecot; start_postfix; start_radicale; start_oauth
wait_port "$IMAPS" dovecot; wait_port "$SUB" postfix; wait_port "$DAV" radicale; wait_port "$AS" oidc-provider
log "up under $DIR (ports in $DIR/ports.env)"
