#!/usr/bin/env bash
# A small internet in network namespaces, for the NAT topology test (tests/coordinator/test_nat_topology.py).
#
#     sudo scripts/netns.sh up      # build it (installs iproute2 and nftables with apt if missing)
#     sudo scripts/netns.sh down    # remove it
#     sudo scripts/netns.sh check   # exit 0 if namespaces, veth pairs and nftables NAT work here
#
# Layout (all names start with mp-, addresses in 10.77.0.0/16 and 192.168.7x.0/24):
#
#   this namespace (the consumer) 10.77.0.2 ── 10.77.0.1  mp-pub (the coordinator's public host)
#                                                 │ 10.77.1.1            │ 10.77.2.1
#                                          wan 10.77.1.2              wan 10.77.2.2
#                                      mp-rt1 (home router,        mp-rt2 (home router,
#                                       nft masquerade)             nft masquerade)
#                                          lan 192.168.71.1           lan 192.168.72.1
#                                                 │                      │
#                                    mp-home1 192.168.71.2      mp-home2 192.168.72.2  (the providers)
#
# A home dials out through its router's address translation; nothing can dial into a home (the
# routers drop new inbound connections and the public side has no route to 192.168.7x.0/24).
# mp-pub forwards between the routers' WAN sides, as the internet would. mp-rt1 keeps a home's
# source port when it can (masquerade: a "cone" NAT, which TCP hole punching can pass);
# mp-rt2 picks a random port for each connection (masquerade random: "symmetric", which it cannot).
set -euo pipefail

log() { echo "netns.sh: $*" >&2; }
ns() { ip netns exec "$@"; }

need_root() {
    if [ "$(id -u)" != 0 ]; then
        log "run me as root (I create network namespaces)"
        exit 1
    fi
}

install_tools() {
    if ! command -v ip >/dev/null || ! command -v nft >/dev/null; then
        log "installing iproute2 and nftables with apt"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >&2
        apt-get install -y -qq iproute2 nftables >&2
    fi
}

down() {
    for n in mp-home1 mp-home2 mp-rt1 mp-rt2 mp-pub; do
        ip netns del "$n" 2>/dev/null || true
    done
    ip link del mp-c0 2>/dev/null || true
}

veth_seq=0
veth() {  # veth NAME_A NS_A ADDR_A NAME_B NS_B ADDR_B   (NS "-" is this namespace)
    # made under unique temporary names here, renamed once inside their namespaces
    veth_seq=$((veth_seq + 1))
    local tmp_a="mptmp${veth_seq}a" tmp_b="mptmp${veth_seq}b"
    ip link add "$tmp_a" type veth peer name "$tmp_b"
    for side in "$tmp_a $1 $2 $3" "$tmp_b $4 $5 $6"; do
        set -- $side
        local run=()
        if [ "$3" != - ]; then ip link set "$1" netns "$3"; run=(ip netns exec "$3"); fi
        "${run[@]}" ip link set "$1" name "$2"
        "${run[@]}" ip addr add "$4" dev "$2"
        "${run[@]}" ip link set "$2" up
    done
}

up() {
    down
    for n in mp-pub mp-rt1 mp-rt2 mp-home1 mp-home2; do
        ip netns add "$n"
        ns "$n" ip link set lo up
    done
    veth mp-c0 - 10.77.0.2/24 mp-c1 mp-pub 10.77.0.1/24
    ns mp-pub sysctl -qw net.ipv4.ip_forward=1
    for k in 1 2; do
        veth "mp-w${k}p" mp-pub "10.77.${k}.1/24" wan "mp-rt${k}" "10.77.${k}.2/24"
        veth lan "mp-rt${k}" "192.168.7${k}.1/24" eth0 "mp-home${k}" "192.168.7${k}.2/24"
        ns "mp-rt${k}" ip route add default via "10.77.${k}.1"
        ns "mp-rt${k}" sysctl -qw net.ipv4.ip_forward=1
        ns "mp-home${k}" ip route add default via "192.168.7${k}.1"
        local how=""; [ "$k" = 2 ] && how=" random"
        ns "mp-rt${k}" nft -f - <<EOF
table ip nat {
    chain masq { type nat hook postrouting priority 100; oifname "wan" masquerade${how}; }
}
table ip filter {
    chain routed { type filter hook forward priority 0; policy drop;
        ct state established,related accept
        iifname "lan" oifname "wan" accept
    }
    chain local_in { type filter hook input priority 0; policy accept;
        iifname "wan" ct state new drop
    }
}
EOF
    done
}

check() {
    trap down EXIT
    up
    # TCP both ways (no ping here): out of a home works, into a home does not
    local py="${PYTHON:-python3}"
    ns mp-pub timeout 10 "$py" -c "import socket; s = socket.create_server(('10.77.0.1', 18999)); c, a = s.accept(); print(a[0])" > /tmp/mp-netns-seen &
    ns mp-home1 "$py" -c "import socket, time
for _ in range(50):
    try: socket.create_connection(('10.77.0.1', 18999), 2).close(); break
    except OSError: time.sleep(0.1)
else: raise SystemExit('a home cannot dial out')"
    wait
    if [ "$(cat /tmp/mp-netns-seen)" != 10.77.1.2 ]; then
        log "the coordinator's host saw $(cat /tmp/mp-netns-seen), not the home router's address: no translation"
        exit 1
    fi
    ns mp-home1 timeout 5 "$py" -c "import socket; s = socket.create_server(('192.168.71.2', 18998)); s.settimeout(3); s.accept()" 2>/dev/null &
    sleep 0.5
    if ns mp-pub "$py" -c "import socket; socket.create_connection(('10.77.1.2', 18998), 1)" 2>/dev/null \
        || ns mp-pub "$py" -c "import socket; socket.create_connection(('192.168.71.2', 18998), 1)" 2>/dev/null; then
        log "a home is reachable from the public side"
        exit 1
    fi
    wait || true
    log "namespaces, veth pairs and nftables masquerade work"
}

need_root
case "${1:-}" in
    up) install_tools; up; log "up: consumer 10.77.0.2, coordinator host 10.77.0.1, homes 192.168.71.2 and 192.168.72.2" ;;
    down) down ;;
    check) install_tools; check ;;
    *) log "usage: $0 up|down|check"; exit 2 ;;
esac
