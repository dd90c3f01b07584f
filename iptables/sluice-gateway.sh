#!/usr/bin/env bash
# Makes this network namespace a sluice gateway for the sandboxes behind one
# interface (or one IPv4 subnet), or undoes it. Idempotent: `apply` twice
# leaves one set of rules, `remove` on a clean namespace does nothing.
#
#   sluice-gateway.sh apply  --iface veth-sb0 [--port 15001] [--proxy-port 8443] [--dns-port 15053] [--source IP]
#   sluice-gateway.sh apply  --iface br0 --bind IP=MAC [--bind IP=MAC ...] | --bind-dynamic | --l2-trusted
#   sluice-gateway.sh apply  --subnet 198.18.0.0/24 --bind IP=MAC ... | --bind-dynamic | --l2-trusted
#   sluice-gateway.sh bind|unbind --iface br0 --bind IP=MAC      (one binding, on applied rules)
#   sluice-gateway.sh remove --iface veth-sb0
#   sluice-gateway.sh status --iface veth-sb0
#
# What `apply` does, for traffic from the sandboxes:
#   - TCP, to any address and port, is REDIRECTed to sluice's transparent
#     listener (--port), which reads SO_ORIGINAL_DST;
#   - with --dns-port, DNS (UDP and TCP port 53, to any address) is
#     REDIRECTed to sluice's DNS door, which answers only the names the
#     sandbox may reach;
#   - UDP to port 443 (QUIC) is rejected at once with ICMP port
#     unreachable, so clients fall back to TCP without waiting;
#   - everything else addressed to this namespace is dropped: other UDP,
#     ICMP, other TCP ports (the admin API, metrics, ssh), ...;
#   - nothing is forwarded onward (FORWARD drop);
#   - IPv6 from the interface is dropped entirely (--iface only: an IPv4
#     subnet cannot name IPv6 sources; use --iface to cover IPv6);
#   - with --proxy-port, TCP to that port on the gateway's own addresses is
#     let through unredirected: sluice's explicit proxy, for sandboxes that
#     use HTTP_PROXY / HTTPS_PROXY;
#   - with --source (--iface only), anything from the interface whose
#     source is not that one address is dropped before conntrack or NAT
#     see it: a sandbox cannot borrow a neighbour's identity;
#   - on a bridge several sandboxes share, or with --subnet, a source address
#     alone does not say which sandbox sent a packet: a neighbour can answer
#     ARP for it. Each --bind IP=MAC admits that address only from that MAC,
#     IPv4 (raw PREROUTING, before conntrack) and ARP (arptables INPUT)
#     alike; every other source, and every other MAC claiming a bound
#     address, is dropped. Without a binding, apply refuses, unless
#     --bind-dynamic (bindings come one by one with `bind`, as sluice adds
#     them at registration; until then nothing passes) or --l2-trusted (the
#     network below already prevents spoofing, e.g. one link per sandbox);
#   - connections to the transparent listener port that were not
#     REDIRECTed are dropped from every interface but loopback.
# Replies to connections sluice accepted pass (conntrack ESTABLISHED).
# Each interface or subnet gets its own chains, named after it, so several
# sandboxes' rules live side by side and are removed one by one.
set -euo pipefail

usage() {
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

[[ $# -ge 1 ]] || usage
action=$1
shift
iface="" subnet="" port=15001 proxy_port="" dns_port="" source="" l2_trusted="" dynamic=""
binds=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --iface) iface=${2:?--iface needs a value}; shift 2 ;;
        --subnet) subnet=${2:?--subnet needs a value}; shift 2 ;;
        --port) port=${2:?--port needs a value}; shift 2 ;;
        --proxy-port) proxy_port=${2:?--proxy-port needs a value}; shift 2 ;;
        --dns-port) dns_port=${2:?--dns-port needs a value}; shift 2 ;;
        --source) source=${2:?--source needs a value}; shift 2 ;;
        --bind) binds+=("${2:?--bind needs IP=MAC}"); shift 2 ;;
        --bind-dynamic) dynamic=1; shift ;;
        --l2-trusted) l2_trusted=1; shift ;;
        -h|--help) usage ;;
        *) echo "unknown argument: $1" >&2; usage ;;
    esac
done
case $action in apply|remove|status|bind|unbind) ;; *) usage ;; esac
if [[ -n $iface && -n $subnet ]] || [[ -z $iface && -z $subnet ]]; then
    echo "give exactly one of --iface or --subnet" >&2
    exit 2
fi
for p in "$port" ${proxy_port:+"$proxy_port"} ${dns_port:+"$dns_port"}; do
    if ! [[ $p =~ ^[0-9]+$ ]] || ((p < 1 || p > 65535)); then
        echo "bad port: $p" >&2
        exit 2
    fi
done
if [[ -n $source ]]; then
    [[ -n $iface ]] || { echo "--source goes with --iface" >&2; exit 2; }
    [[ $source =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]] || { echo "bad --source: $source" >&2; exit 2; }
fi
for b in "${binds[@]}"; do
    [[ $b =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}=([0-9A-Fa-f]{2}:){5}[0-9A-Fa-f]{2}$ ]] || { echo "bad --bind (IP=MAC): $b" >&2; exit 2; }
done
if [[ $action == bind || $action == unbind ]] && ((${#binds[@]} != 1)); then
    echo "$action takes exactly one --bind IP=MAC" >&2
    exit 2
fi
if [[ -n $iface ]]; then
    [[ $iface =~ ^[A-Za-z0-9_.@-]{1,15}$ ]] || { echo "bad interface name: $iface" >&2; exit 2; }
    match=(-i "$iface")
    tag=$iface
else
    [[ $subnet =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}/[0-9]{1,2}$ ]] || { echo "bad IPv4 subnet: $subnet" >&2; exit 2; }
    match=(-s "$subnet")
    # Chain names allow 28 characters: the subnet's digits make the tag.
    tag=$(echo "$subnet" | tr './' '_-')
fi
# Shared links: a bridge (several sandboxes on one segment) or a subnet
# (sources from anywhere). Identity by source address needs bindings there.
shared=""
if [[ -n $subnet ]] || ip -o link show type bridge 2>/dev/null | grep -q ": ${iface}[:@]"; then
    shared=1
fi
if [[ $action == apply && -n $shared && ${#binds[@]} -eq 0 && -z $dynamic && -z $l2_trusted ]]; then
    echo "refusing: ${iface:-$subnet} is shared by several sandboxes and no --bind IP=MAC was given;" >&2
    echo "a sandbox could claim a neighbour's address. Bind each address to its MAC," >&2
    echo "use --bind-dynamic (sluice binds at registration), or --l2-trusted if the" >&2
    echo "network below already prevents spoofing." >&2
    exit 2
fi
if [[ $action == apply && $iface == lo ]]; then
    echo "refusing: lo is the gateway's own loopback, not a sandbox link" >&2
    exit 2
fi
if [[ $action == apply && -n $iface ]] && ip -o route show default 2>/dev/null | grep -qE " dev $iface( |$)"; then
    echo "refusing: $iface carries this host's default route (its upstream)" >&2
    exit 2
fi
raw="SL-RAW-$tag"
l2="SL-L2-$tag"
arp="SL-ARP-$tag"
lsn="SL-LSN-$tag"
pre="SL-PRE-$tag"
in="SL-IN-$tag"
fwd="SL-FWD-$tag"

# Deletes every copy of a jump rule, then flushes and deletes the chain.
drop_chain() {
    local cmd=$1 table=$2 parent=$3 chain=$4
    shift 4
    while $cmd -w -t "$table" -C "$parent" "$@" -j "$chain" 2>/dev/null; do
        $cmd -w -t "$table" -D "$parent" "$@" -j "$chain"
    done
    if $cmd -w -t "$table" -n -L "$chain" >/dev/null 2>&1; then
        $cmd -w -t "$table" -F "$chain"
        $cmd -w -t "$table" -X "$chain"
    fi
}

# arptables matches sources with --source-ip, interfaces with -i.
if [[ -n $iface ]]; then arp_match=(-i "$iface"); else arp_match=(--source-ip "$subnet"); fi

drop_arp_chain() {
    while arptables -C INPUT "${arp_match[@]}" -j "$arp" 2>/dev/null; do
        arptables -D INPUT "${arp_match[@]}" -j "$arp"
    done
    if arptables -n -L "$arp" >/dev/null 2>&1; then
        arptables -F "$arp"
        arptables -X "$arp"
    fi
}

# One binding: admitted (before the chains' final DROP), or no longer.
bind_rules() {
    local verb=$1 ip=${2%%=*} mac=${2#*=}
    iptables -w -t raw "$verb" "$l2" -s "$ip" -m mac --mac-source "$mac" -j RETURN
    arptables "$verb" "$arp" --source-ip "$ip" --source-mac "$mac" -j RETURN
}

remove() {
    drop_chain iptables raw PREROUTING "$l2" "${match[@]}"
    drop_arp_chain
    drop_chain iptables filter INPUT "$lsn"
    drop_chain iptables raw PREROUTING "$raw" "${match[@]}"
    drop_chain iptables nat PREROUTING "$pre" "${match[@]}"
    drop_chain iptables filter INPUT "$in" "${match[@]}"
    drop_chain iptables filter FORWARD "$fwd" "${match[@]}"
    if [[ -n $iface ]]; then
        drop_chain ip6tables filter INPUT "$in" "${match[@]}"
        drop_chain ip6tables filter FORWARD "$fwd" "${match[@]}"
    fi
}

apply() {
    remove
    if [[ -n $source ]]; then
        iptables -w -t raw -N "$raw"
        iptables -w -t raw -A "$raw" ! -s "$source" -j DROP
        iptables -w -t raw -I PREROUTING 1 "${match[@]}" -j "$raw"
    fi
    if ((${#binds[@]} > 0)) || [[ -n $dynamic ]]; then
        iptables -w -t raw -N "$l2"
        iptables -w -t raw -A "$l2" -j DROP
        iptables -w -t raw -I PREROUTING 1 "${match[@]}" -j "$l2"
        arptables -N "$arp"
        arptables -A "$arp" -j DROP
        arptables -I INPUT 1 "${arp_match[@]}" -j "$arp"
        for b in "${binds[@]}"; do
            bind_rules -I "$b"
        done
    fi
    iptables -w -N "$lsn"
    iptables -w -A "$lsn" -p tcp --dport "$port" ! -i lo -m conntrack ! --ctstate DNAT -j DROP
    if [[ -n $dns_port ]]; then
        iptables -w -A "$lsn" -p udp --dport "$dns_port" ! -i lo -m conntrack ! --ctstate DNAT -j DROP
        iptables -w -A "$lsn" -p tcp --dport "$dns_port" ! -i lo -m conntrack ! --ctstate DNAT -j DROP
    fi
    iptables -w -I INPUT 1 -j "$lsn"
    iptables -w -t nat -N "$pre"
    if [[ -n $proxy_port ]]; then
        iptables -w -t nat -A "$pre" -p tcp --dport "$proxy_port" -m addrtype --dst-type LOCAL -j RETURN
    fi
    if [[ -n $dns_port ]]; then
        iptables -w -t nat -A "$pre" -p udp --dport 53 -j REDIRECT --to-ports "$dns_port"
        iptables -w -t nat -A "$pre" -p tcp --dport 53 -j REDIRECT --to-ports "$dns_port"
    fi
    iptables -w -t nat -A "$pre" -p tcp -j REDIRECT --to-ports "$port"
    # QUIC to any address becomes local, so INPUT's REJECT answers it at
    # once whether or not this host forwards IPv4.
    iptables -w -t nat -A "$pre" -p udp --dport 443 -j REDIRECT --to-ports 443
    iptables -w -t nat -I PREROUTING 1 "${match[@]}" -j "$pre"

    iptables -w -N "$in"
    iptables -w -A "$in" -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
    # Only connections that were REDIRECTed reach the listener: a sandbox
    # that dials the gateway's own address on another port (admin, metrics)
    # is dropped, and so is one that dials the listener port directly.
    iptables -w -A "$in" -p tcp --dport "$port" -m conntrack --ctstate DNAT -j ACCEPT
    if [[ -n $proxy_port ]]; then
        iptables -w -A "$in" -p tcp --dport "$proxy_port" -m addrtype --dst-type LOCAL -j ACCEPT
    fi
    if [[ -n $dns_port ]]; then
        iptables -w -A "$in" -p udp --dport "$dns_port" -m conntrack --ctstate DNAT -j ACCEPT
        iptables -w -A "$in" -p tcp --dport "$dns_port" -m conntrack --ctstate DNAT -j ACCEPT
    fi
    iptables -w -A "$in" -p udp --dport 443 -j REJECT --reject-with icmp-port-unreachable
    iptables -w -A "$in" -j DROP
    iptables -w -I INPUT 1 "${match[@]}" -j "$in"

    iptables -w -N "$fwd"
    iptables -w -A "$fwd" -p udp --dport 443 -j REJECT --reject-with icmp-port-unreachable
    iptables -w -A "$fwd" -j DROP
    iptables -w -I FORWARD 1 "${match[@]}" -j "$fwd"

    if [[ -n $iface ]]; then
        ip6tables -w -N "$in"
        ip6tables -w -A "$in" -j DROP
        ip6tables -w -I INPUT 1 "${match[@]}" -j "$in"
        ip6tables -w -N "$fwd"
        ip6tables -w -A "$fwd" -j DROP
        ip6tables -w -I FORWARD 1 "${match[@]}" -j "$fwd"
    fi
    isolate_ports
}

# On a bridge every port is isolated: a sandbox's frames reach the gateway
# (the bridge itself) and no neighbour, so none can answer ARP for the
# gateway or send another raw frames.
isolate_ports() {
    [[ -n $iface && -n $shared ]] || return 0
    local port
    for port in $(ip -o link show master "$iface" | awk -F': ' '{print $2}' | cut -d@ -f1); do
        bridge link set dev "$port" isolated on
    done
}

bind() {
    iptables -w -t raw -n -L "$l2" >/dev/null 2>&1 || { echo "no $l2 chain: apply with --bind or --bind-dynamic first" >&2; exit 1; }
    if ! iptables -w -t raw -C "$l2" -s "${binds[0]%%=*}" -m mac --mac-source "${binds[0]#*=}" -j RETURN 2>/dev/null; then
        bind_rules -I "${binds[0]}"
        isolate_ports
    fi
}

unbind() {
    while iptables -w -t raw -C "$l2" -s "${binds[0]%%=*}" -m mac --mac-source "${binds[0]#*=}" -j RETURN 2>/dev/null; do
        bind_rules -D "${binds[0]}"
    done
}

status() {
    iptables -w -t raw -S "$l2" 2>/dev/null || echo "no $l2 chain"
    arptables -n -L "$arp" 2>/dev/null || echo "no $arp chain"
    iptables -w -S "$lsn" 2>/dev/null || echo "no $lsn chain"
    iptables -w -t raw -S "$raw" 2>/dev/null || echo "no $raw chain"
    iptables -w -t nat -S "$pre" 2>/dev/null || echo "no $pre chain"
    iptables -w -S "$in" 2>/dev/null || echo "no $in chain"
    iptables -w -S "$fwd" 2>/dev/null || echo "no $fwd chain"
    if [[ -n $iface ]]; then
        ip6tables -w -S "$in" 2>/dev/null || echo "no IPv6 $in chain"
    fi
}

"$action"
