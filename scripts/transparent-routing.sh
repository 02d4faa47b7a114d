#!/usr/bin/env bash
# The return path of `splice-relay --transparent`: a backend answers the
# client's address, so its replies must be handed to the relay's socket
# instead of being routed on (or dropped). This adds, or removes, exactly:
#
#   - a firewall rule marking packets that arrive on IFACE and belong to a
#     transparent socket: an nftables table of its own (inet
#     splice_relay_transparent), or, without nft, one iptables and one
#     ip6tables mangle rule per IFACE (`-m socket --transparent`);
#   - `ip rule fwmark MARK/MARK lookup TABLE` (IPv4 and IPv6);
#   - `local 0.0.0.0/0 dev lo` and `local ::/0 dev lo` in TABLE.
#
#   scripts/transparent-routing.sh up|down [--mark N] [--table N] IFACE...
#
# IFACE is where the backends' replies come in: docker0 (or a user-defined
# bridge, br-...) for Docker, or the interface facing a plain backend.
# Defaults: --mark 0x1 (only this bit is set or matched) --table 2711.
# `up` is idempotent and makes the rules match exactly the IFACEs given
# (the nft table is rebuilt); `down` removes what `up` added (the same
# --mark and --table; with iptables, the same IFACEs) and nothing else.
# Needs root, iproute2, and nftables (nft) or iptables.
#
# SPLICE_RELAY_FIREWALL=nft|iptables picks the tool (unset or empty: nft
# when present, else iptables); the one named must be installed, or the
# script exits 1 saying so, having changed nothing. `down` must use the
# tool `up` used. With iptables, `down` deletes its rules but not the
# mangle table's built-in chains iptables made for them (iptables has no
# command that removes a table): with iptables-nft, empty `ip mangle` and
# `ip6 mangle` tables with an empty PREROUTING chain, policy accept, stay.
set -euo pipefail

usage() {
  echo "usage: $0 up|down [--mark N] [--table N] IFACE..." >&2
  exit 2
}

[ $# -ge 1 ] || usage
action=$1
shift
case "$action" in up | down) ;; *) usage ;; esac
mark=0x1
table=2711
ifaces=()
while [ $# -gt 0 ]; do
  case "$1" in
    --mark) [ $# -ge 2 ] || usage; mark=$2; shift 2 ;;
    --table) [ $# -ge 2 ] || usage; table=$2; shift 2 ;;
    -*) usage ;;
    *) ifaces+=("$1"); shift ;;
  esac
done
[ ${#ifaces[@]} -gt 0 ] || usage
[[ "$mark" =~ ^(0x[0-9a-fA-F]+|[0-9]+)$ ]] && [ $((mark)) -gt 0 ] && [ $((mark)) -le 4294967295 ] || {
  echo "$0: --mark must be a number from 1 to 0xffffffff" >&2
  exit 2
}
[[ "$table" =~ ^[0-9]+$ ]] && [ "$table" -gt 0 ] && [ "$table" -lt 4294967295 ] \
  && [ "$table" != 253 ] && [ "$table" != 254 ] && [ "$table" != 255 ] || {
  echo "$0: --table must be a number, not 0 or a main/default/local table" >&2
  exit 2
}
for i in "${ifaces[@]}"; do
  [[ "$i" =~ ^[A-Za-z0-9_.@:-]{1,15}$ ]] || { echo "$0: bad interface name '$i'" >&2; exit 2; }
done
command -v ip >/dev/null || { echo "$0: needs ip (apt-get install iproute2)" >&2; exit 1; }
mark=$(printf '0x%x' $((mark)))
nft_table=splice_relay_transparent

has_iptables() { command -v iptables >/dev/null && command -v ip6tables >/dev/null; }
case "${SPLICE_RELAY_FIREWALL:-}" in
  nft)
    command -v nft >/dev/null || {
      echo "$0: SPLICE_RELAY_FIREWALL=nft, but nft is not on PATH (apt-get install nftables)" >&2
      exit 1
    }
    firewall=nft
    ;;
  iptables)
    has_iptables || {
      echo "$0: SPLICE_RELAY_FIREWALL=iptables, but iptables or ip6tables is not on PATH (apt-get install iptables)" >&2
      exit 1
    }
    firewall=iptables
    ;;
  "")
    if command -v nft >/dev/null; then
      firewall=nft
    elif has_iptables; then
      firewall=iptables
    else
      echo "$0: needs nft (apt-get install nftables) or iptables (apt-get install iptables)" >&2
      exit 1
    fi
    ;;
  *)
    echo "$0: SPLICE_RELAY_FIREWALL must be nft or iptables, not '$SPLICE_RELAY_FIREWALL'" >&2
    exit 2
    ;;
esac

# Whether `ip rule show` lists ours. grep reads it all (no -q): with
# pipefail, an early exit would fail `ip` with SIGPIPE and so the test.
has_rule() { ip "$1" rule show | grep -E "fwmark $mark/$mark lookup $table( |\$)" >/dev/null; }

up() {
  for v in -4 -6; do
    has_rule "$v" || ip "$v" rule add fwmark "$mark/$mark" lookup "$table"
  done
  ip -4 route replace local 0.0.0.0/0 dev lo table "$table"
  ip -6 route replace local ::/0 dev lo table "$table"
  if [ "$firewall" = nft ]; then
    local rules="" i
    for i in "${ifaces[@]}"; do
      rules+="    iifname \"$i\" meta l4proto { tcp, udp } socket transparent 1 meta mark set meta mark or $mark"$'\n'
    done
    # Rebuilt in one transaction: the rules match exactly these IFACEs.
    nft list table inet "$nft_table" >/dev/null 2>&1 && nft delete table inet "$nft_table"
    nft -f - <<EOF
table inet $nft_table {
  chain prerouting {
    type filter hook prerouting priority mangle; policy accept;
$rules  }
}
EOF
  else
    local t i
    for t in iptables ip6tables; do
      for i in "${ifaces[@]}"; do
        local rule=(PREROUTING -i "$i" -m socket --transparent -j MARK --set-xmark "$mark/$mark")
        "$t" -t mangle -C "${rule[@]}" 2>/dev/null || "$t" -t mangle -A "${rule[@]}"
      done
    done
  fi
}

down() {
  local v
  for v in -4 -6; do
    while has_rule "$v"; do ip "$v" rule del fwmark "$mark/$mark" lookup "$table"; done
  done
  ip -4 route del local 0.0.0.0/0 dev lo table "$table" 2>/dev/null || true
  ip -6 route del local ::/0 dev lo table "$table" 2>/dev/null || true
  if [ "$firewall" = nft ]; then
    if nft list table inet "$nft_table" >/dev/null 2>&1; then nft delete table inet "$nft_table"; fi
  else
    local t i
    for t in iptables ip6tables; do
      for i in "${ifaces[@]}"; do
        local rule=(PREROUTING -i "$i" -m socket --transparent -j MARK --set-xmark "$mark/$mark")
        while "$t" -t mangle -C "${rule[@]}" 2>/dev/null; do "$t" -t mangle -D "${rule[@]}"; done
      done
    done
  fi
}

"$action"
