#!/bin/sh
# Start a private Postfix instance for tests, as root, touching nothing system-wide (Debian package postfix,
# preseeded to "No configuration": `make test-deps` installs it). Two roles:
#
#   postfix-instance.sh DIR client PORT RELAY_PORT
#       smtpd on 127.0.0.1:PORT (accepts from 127.0.0.0/8), relayhost = [127.0.0.1]:RELAY_PORT: a real MTA
#       that sends its mail through the relay under test, queues 4xx answers and bounces on 5xx.
#       Inject with:  sendmail -C DIR -f from@example.org to@example.net < message
#       or SMTP to 127.0.0.1:PORT. Flush the queue now: postqueue -c DIR -f
#       Queue listing: postqueue -c DIR -j (JSON lines). Log: DIR/maillog.
#       Extra main.cf lines from $POSTFIX_MAIN (e.g. "smtp_tls_security_level = encrypt"), extra master.cf
#       lines from $POSTFIX_MASTER (e.g. a transport "relay1 unix - - n - - smtp").
#
#   postfix-instance.sh DIR downstream PORT [CERT KEY]
#       smtpd on 127.0.0.1:PORT that accepts every recipient and stores each message under DIR/mail/
#       (one file per message, via a pipe to a shell script); with CERT KEY it offers STARTTLS.
#       Extra main.cf lines from $POSTFIX_MAIN (e.g. "smtpd_sasl_auth_enable = yes" plus a SASL setup).
#
# Both log their TLS sessions ("... TLS connection established ...") and retry deferred mail every 5s.
#
# Stop with: postfix -c DIR stop
set -eu
[ $# -ge 3 ] || { sed -n '2,20p' "$0"; exit 2; }
dir=$(mkdir -p "$1" && cd "$1" && pwd)
role=$2; port=$3
mkdir -p "$dir/queue" "$dir/data" "$dir/mail"
chown postfix "$dir/data"
chmod 1777 "$dir/mail"
cat > "$dir/main.cf" <<CONF
compatibility_level = 3.6
queue_directory = $dir/queue
data_directory = $dir/data
mail_owner = postfix
setgid_group = postdrop
myhostname = $role-$port.test
mydomain = $role-$port.test
myorigin = $role-$port.test
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
maillog_file = $dir/maillog
maillog_file_prefixes = $dir
alias_maps =
alias_database =
smtputf8_enable = yes
biff = no
queue_run_delay = 5s
minimal_backoff_time = 5s
maximal_backoff_time = 30s
smtp_tls_loglevel = 1
smtpd_tls_loglevel = 1
smtpd_tls_received_header = yes
CONF
case $role in
client)
    relay_port=${4:?client needs RELAY_PORT}
    cat >> "$dir/main.cf" <<CONF
relayhost = [127.0.0.1]:$relay_port
mydestination =
smtp_tls_security_level = may
CONF
    ;;
downstream)
    cat > "$dir/store.sh" <<'SH'
#!/bin/sh
# one file per delivered message: headers added by pipe(8) give sender and recipient
umask 022
cat > "$1/$(date +%s%N).$$.eml"
SH
    chmod 755 "$dir/store.sh"
    cat >> "$dir/main.cf" <<CONF
mydestination =
relay_domains = static:ALL
smtpd_recipient_restrictions = permit_mynetworks, reject
relay_transport = store
default_transport = store
store_destination_recipient_limit = 1
CONF
    if [ $# -ge 5 ]; then
        cat >> "$dir/main.cf" <<CONF
smtpd_tls_cert_file = $4
smtpd_tls_key_file = $5
smtpd_tls_security_level = may
CONF
    fi
    ;;
*) echo "role must be client or downstream" >&2; exit 2 ;;
esac
# postconf -e replaces a setting in place: no "overriding earlier entry" warnings on every command
printf '%s\n' "${POSTFIX_MAIN:-}" | while IFS= read -r line; do
    [ -z "$line" ] || postconf -c "$dir" -e "$line"
done
cat > "$dir/master.cf" <<CONF
127.0.0.1:$port inet n - n - - smtpd
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
proxywrite unix -       -       n       -       1       proxymap
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
store     unix  -       n       n       -       -       pipe
  flags=FR user=nobody argv=$dir/store.sh $dir/mail
CONF
[ -z "${POSTFIX_MASTER:-}" ] || printf '%s\n' "$POSTFIX_MASTER" >> "$dir/master.cf"
postfix -c "$dir" check || { echo "postfix check failed for $dir/main.cf" >&2; exit 1; }
touch "$dir/queue/quick-start"    # postfix-script: start without checking again what check just did
postfix -c "$dir" start >/dev/null 2>&1 || { tail -5 "$dir/maillog" >&2; exit 1; }
i=0
until python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1)" "$port" 2>/dev/null; do
    i=$((i + 1)); [ $i -lt 50 ] || { echo "postfix $role on $port did not start" >&2; exit 1; }
    sleep 0.1
done
echo "postfix $role: smtpd 127.0.0.1:$port, config $dir (stop: postfix -c $dir stop)"
