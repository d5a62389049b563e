#!/usr/bin/env bash
# Funneled TCP and UDP at speed, against plain traffic in the same run.
#
#   client ──veth── router ──veth── server
#
# The router's veths have tx/tso/gso off, so segmentation and checksums are
# completed on the path as a real NIC would; the endpoints keep every
# offload at its default.  sfunnel funnels on the client's egress and
# unfunnels on the server's ingress; for request/response the replies are
# funneled back (server egress → client ingress).  Plain rows use ports no
# rule matches, through the same programs.
#
# Prints one table: throughput of each funneled flow as a ratio of plain,
# UDP loss, request/response rates, and a bulk transfer whose sha256 is
# compared at both ends, with the server's checksum error counters.  The
# throughput rows are measured over IPv4 and over IPv6 (`ip6` twins of the
# rules, on the same ports, in the same rulesets).  Bulk TCP is measured
# as loaded by default, then in the same round with each detour option
# changed (docs/design.md, "The segmentation detour"): DETOUR_RETURN=transmit
# (segments back out of the interface), and DETOUR_CPUS=sender (segments
# funneled by the CPU that sent them).  Each run also samples the CPU time
# the machine spent (/proc/stat): the last column is CPU time per bit
# against plain's in the same round.  Unpaced UDP is also measured with
# the client's tx checksumming off, funneled in place, against plain UDP
# sent the same way: the datagrams of the default rows have their checksum
# still owed, and take the detour (docs/design.md, "Checksums through NAT").  A
# last round runs unpaced UDP again
# with kernel.bpf_stats_enabled on (restored after), and prints the time
# sfunnel's programs took per packet at each end, and their share of the
# run: what funneling a datagram costs on the CPU that carries it.
#
#   scripts/bench-throughput.sh            (root; builds sfunnel)
#   ROUNDS=5 SECONDS_PER_RUN=10 BULK_MIB=1024 UDP_RATE=2G scripts/bench-throughput.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench-throughput: needs root (namespaces, BPF)" >&2; exit 1; }

T=${SECONDS_PER_RUN:-5}
ROUNDS=${ROUNDS:-3}
BULK_MIB=${BULK_MIB:-1024}
UDP_RATE=${UDP_RATE:-1G}   # the paced UDP rows; the others send as fast as one sender can
RR_SECONDS=${RR_SECONDS:-3}
C=sfbtc R=sfbtr S=sfbts
CIP=10.77.1.2 SIP=10.77.2.2 SIP6=fd00:77:2::2

cargo build --release --locked -q
SF=target/release/sfunnel

STATS_WAS=$(sysctl -n kernel.bpf_stats_enabled)
cleanup() {
  set +e
  sysctl -qw kernel.bpf_stats_enabled="$STATS_WAS"
  for ns in $C $S; do
    $SF unload -n "$ns" -d both >/dev/null 2>&1
  done
  for pid in $(jobs -p); do kill "$pid" 2>/dev/null; done
  # iperf3 servers run as daemons inside the namespaces: only ours go.
  for ns in $C $R $S; do ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null; ip netns del "$ns" 2>/dev/null; done
  rm -rf "$TMP"
}
TMP=$(mktemp -d)
trap cleanup EXIT

for ns in $C $R $S; do ip netns add $ns; ip -n $ns link set lo up; done
ip link add sfbt0 netns $C type veth peer name sfbt1 netns $R
ip link add sfbt2 netns $R type veth peer name sfbt3 netns $S
ip -n $C addr add $CIP/24 dev sfbt0
ip -n $R addr add 10.77.1.1/24 dev sfbt1
ip -n $R addr add 10.77.2.1/24 dev sfbt2
ip -n $S addr add $SIP/24 dev sfbt3
for x in "$C sfbt0" "$R sfbt1" "$R sfbt2" "$S sfbt3"; do set -- $x; ip -n "$1" link set "$2" up; done
ip -n $C -6 addr add fd00:77:1::2/64 dev sfbt0 nodad
ip -n $R -6 addr add fd00:77:1::1/64 dev sfbt1 nodad
ip -n $R -6 addr add fd00:77:2::1/64 dev sfbt2 nodad
ip -n $S -6 addr add $SIP6/64 dev sfbt3 nodad
ip -n $C route add default via 10.77.1.1
ip -n $S route add default via 10.77.2.1
ip -n $C -6 route add default via fd00:77:1::1
ip -n $S -6 route add default via fd00:77:2::1
ip netns exec $R sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
ip netns exec $R ethtool -K sfbt1 tx off tso off gso off >/dev/null
ip netns exec $R ethtool -K sfbt2 tx off tso off gso off >/dev/null

# Each rule and its IPv6 twin (`ip6` in front).
dual() { printf '%s\n' "$1"; printf '%s\n' "$1" | sed '/./s/^/ip6 /'; }

# Funneled: 5201 TCP/TCP, 5202 TCP/UDP, 5203 UDP/TCP, 5204 UDP/UDP,
# 5205 request/response (replies funneled back), 5211/5212 bulk sha256.
# $1: how segments leave the detour (--detour-return), $2: which CPUs
# funnel them (--detour-cpus); a rerun updates the attachment in place.
client_load() {
  $SF load -n $C -i sfbt0 -d egress --detour-return "$1" --detour-cpus "$2" "$(dual "
tcp dport 5201 actions funnel tcp sport 540 dport 80
tcp dport 5211 actions funnel tcp sport 540 dport 80
tcp dport 5202 actions funnel udp sport 541 dport 81
tcp dport 5212 actions funnel udp sport 541 dport 81
udp dport 5203 actions funnel tcp sport 542 dport 82
udp dport 5204 actions funnel udp sport 543 dport 83
tcp dport 5205 actions funnel tcp sport 544 dport 84")" >/dev/null
}
# A field of one attachment, as `sfunnel status --json` gives it: $1 the
# interface, $2 the direction, then the keys down to the field.
status_field() {
  $SF status --json | python3 -c 'import json,sys
v = next(a for a in json.load(sys.stdin) if a["iface"] == sys.argv[1] and a["direction"] == sys.argv[2])
for k in sys.argv[3:]: v = v[k]
print(v)' "$@"
}
client_load auto all
back=$(status_field sfbt0 egress detour back)
$SF load -n $S -i sfbt3 -d ingress "$(dual "
tcp sport 540 dport 80 actions unfunnel tcp
udp sport 541 dport 81 actions unfunnel tcp
tcp sport 542 dport 82 actions unfunnel udp
udp sport 543 dport 83 actions unfunnel udp
tcp sport 544 dport 84 actions unfunnel tcp")" >/dev/null
$SF load -n $S -i sfbt3 -d egress "tcp sport 5205 actions funnel tcp sport 84 dport 544" >/dev/null
$SF load -n $C -i sfbt0 -d ingress "tcp sport 84 dport 544 actions unfunnel tcp" >/dev/null

for p in 5201 5202 5203 5204 5301 5303; do
  ip netns exec $S iperf3 -s -D -p $p --logfile "$TMP/iperf-$p.log"
done
sleep 0.5

# CPU time the machine has spent, in clock ticks (user, nice, system, irq,
# softirq, steal).
busy() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }
# "Gbit/s busy-ticks" (and for UDP "Gbit/s busy-ticks lost%") from
# iperf3's receiver line and /proc/stat around the run.
# $1: port; the last argument, if any: the server's address (default IPv4).
tcp_run() {
  local b0 g
  b0=$(busy)
  g=$(ip netns exec $C iperf3 -c "${2:-$SIP}" -p "$1" -t "$T" -f m | awk '/receiver/ {print $(NF-2)/1000}')
  echo "$g $(($(busy) - b0))"
}
# 4 MiB socket buffers: loss then comes from the path, not from a receiver
# that was descheduled for a moment.
# Packets dropped at a full backlog queue (any CPU's; netdev_max_backlog),
# the second column of /proc/net/softnet_stat.
backlog_drops() { local s=0 d; while read -r _ d _; do s=$((s + 16#$d)); done </proc/net/softnet_stat; echo $s; }
# "Gbit/s busy-ticks lost% backlog-drops"
udp_run() {
  local b0 d0 r
  b0=$(busy) d0=$(backlog_drops)
  r=$(ip netns exec $C iperf3 -c "${3:-$SIP}" -p "$1" -t "$T" -u -l 1400 -b "$2" -w 4M -f m |
    awk '/receiver/ {for (i=1;i<=NF;i++) if ($i=="Mbits/sec") r=$(i-1); gsub(/[()%]/,"",$NF); l=$(NF-1); gsub(/[()%]/,"",l); print r/1000, l}')
  read -r g l <<<"$r"
  echo "$g $(($(busy) - b0)) $l $(($(backlog_drops) - d0))"
}

# Request/response: 64-byte requests, each answered before the next.
cat > "$TMP/rr.py" <<'EOF'
import socket, sys, time
mode, host, port, secs = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
if mode == "server":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port)); s.listen(1); c, _ = s.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        d = c.recv(64)
        if not d: break
        c.sendall(d)
else:
    c = socket.create_connection((host, port)); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg, n, end = b"x" * 64, 0, time.time() + secs
    while time.time() < end:
        c.sendall(msg); got = 0
        while got < 64: got += len(c.recv(64 - got))
        n += 1
    print(f"{n / secs:.0f}")
EOF
rr_run() {
  ip netns exec $S python3 "$TMP/rr.py" server $SIP "$1" 0 & sleep 0.3
  ip netns exec $C python3 "$TMP/rr.py" client $SIP "$1" "$RR_SECONDS"
  wait
}

# Bulk: BULK_MIB of random bytes, sha256 at both ends.
cat > "$TMP/bulk.py" <<'EOF'
import hashlib, os, socket, sys, time
mode, host, port, mib = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
h = hashlib.sha256()
if mode == "server":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port)); s.listen(1); c, _ = s.accept(); n = 0
    while True:
        d = c.recv(1 << 20)
        if not d: break
        h.update(d); n += len(d)
    print(n, h.hexdigest())
else:
    c = socket.create_connection((host, port)); block = os.urandom(1 << 20); t = time.time()
    for i in range(mib):
        chunk = hashlib.sha256(block + i.to_bytes(8, "little")).digest() * 32768  # 1 MiB, differs per MiB
        h.update(chunk); c.sendall(chunk)
    c.close(); print(mib << 20, h.hexdigest())
EOF
bulk_run() {
  ip netns exec $S python3 "$TMP/bulk.py" server $SIP "$1" 0 >"$TMP/bulk-$1.srv" & sleep 0.3
  ip netns exec $C python3 "$TMP/bulk.py" client $SIP "$1" "$BULK_MIB" >"$TMP/bulk-$1.cli"
  wait
  read -r n1 h1 <"$TMP/bulk-$1.cli"; read -r n2 h2 <"$TMP/bulk-$1.srv"
  if [ "$h1" = "$h2" ] && [ "$n1" = "$n2" ]; then echo "$((n2 >> 20)) MiB sha256 identical (${h2:0:16}…)"; else echo "MISMATCH: sent $n1 $h1, received $n2 $h2"; fi
}

csum_errors() { ip netns exec $S nstat -az TcpInCsumErrors UdpInCsumErrors Udp6InCsumErrors | awk '/CsumErrors/ {s += $2} END {print s+0}'; }

printf '\nsfunnel throughput: client → router (tx/tso/gso off) → server, kernel %s\n' "$(uname -r)"
printf '%s rounds of %s s runs, each funneled run next to a plain one; median (lowest-highest)\n' "$ROUNDS" "$T"
printf 'segments leave the detour by: %s (DETOUR_RETURN=auto), funneled on CPUs %s (DETOUR_CPUS=all), except where the rows say\n' "$back" "$(cat /sys/devices/system/cpu/online)"
printf 'CPU/bit: CPU time the machine spent per bit received, against plain in the same round\n'
printf 'backlog: most packets any one run dropped at a full backlog queue (/proc/net/softnet_stat, all CPUs)\n\n'

# Each round runs plain and the funneled flows back to back, so that a
# noisy neighbour hits both; the ratio is taken per round.
declare -a P TT TU TTX TUX TTS TUS UP UT UU UTS UUS UPC UTC UUC P6 TT6 TU6 UP6 UT6 UU6
for ((r = 0; r < ROUNDS; r++)); do
  P+=("$(tcp_run 5301)"); TT+=("$(tcp_run 5201)"); TU+=("$(tcp_run 5202)")
  client_load transmit all; TTX+=("$(tcp_run 5201)"); TUX+=("$(tcp_run 5202)")
  client_load auto sender; TTS+=("$(tcp_run 5201)"); TUS+=("$(tcp_run 5202)"); client_load auto all
  UP+=("$(udp_run 5303 0)"); UT+=("$(udp_run 5203 0)"); UU+=("$(udp_run 5204 0)")
  client_load auto sender; UTS+=("$(udp_run 5203 0)"); UUS+=("$(udp_run 5204 0)"); client_load auto all
  # The sender's checksums complete (tx off): funneled in place, not in
  # the detour (docs/design.md, "Checksums through NAT").
  ip netns exec $C ethtool -K sfbt0 tx off >/dev/null
  UPC+=("$(udp_run 5303 0)"); UTC+=("$(udp_run 5203 0)"); UUC+=("$(udp_run 5204 0)")
  ip netns exec $C ethtool -K sfbt0 tx on >/dev/null
  P6+=("$(tcp_run 5301 $SIP6)"); TT6+=("$(tcp_run 5201 $SIP6)"); TU6+=("$(tcp_run 5202 $SIP6)")
  UP6+=("$(udp_run 5303 0 $SIP6)"); UT6+=("$(udp_run 5203 0 $SIP6)"); UU6+=("$(udp_run 5204 0 $SIP6)")
done
read -r pu _ pul _ < <(udp_run 5303 "$UDP_RATE"); read -r tu1 _ tul _ < <(udp_run 5203 "$UDP_RATE"); read -r uu1 _ uul1 _ < <(udp_run 5204 "$UDP_RATE")
# The program time at both ends of an unpaced UDP run: "Gbit/s ns/packet
# at the sender, ns/packet at the receiver, share of the run (%)".
prog_stats() { bpftool prog show id "$1" -j | python3 -c 'import json,sys; p = json.load(sys.stdin); print(p.get("run_time_ns", 0), p.get("run_cnt", 0))'; }
SEND_PROG=$(status_field sfbt0 egress prog_id) RECV_PROG=$(status_field sfbt3 ingress prog_id)
# The detour's programs (the client's funnels what it sends; the server's
# only its TCP replies, which this run has none of).
DETOUR_PROGS=$(bpftool prog show name sfunnel_detour -j | python3 -c 'import json,sys; print(" ".join(str(p["id"]) for p in json.load(sys.stdin)))')
detour_stats() { local t=0 n=0 a b; for id in $DETOUR_PROGS; do read -r a b < <(prog_stats "$id"); t=$((t + a)) n=$((n + b)); done; echo "$t $n"; }
# "Gbit/s, ns per packet at the sender's egress, in the sender's detour
# (per packet sent; - when none went through it), at the receiver, and
# the three as a share of the run".
timed_udp_run() {
  local s0 sn0 s1 sn1 r0 rn0 r1 rn1 d0 dn0 d1 dn1 g
  read -r s0 sn0 < <(prog_stats "$SEND_PROG"); read -r r0 rn0 < <(prog_stats "$RECV_PROG"); read -r d0 dn0 < <(detour_stats)
  read -r g _ < <(udp_run "$1" 0)
  read -r s1 sn1 < <(prog_stats "$SEND_PROG"); read -r r1 rn1 < <(prog_stats "$RECV_PROG"); read -r d1 dn1 < <(detour_stats)
  awk -v g="$g" -v s="$((s1 - s0))" -v sn="$((sn1 - sn0))" -v r="$((r1 - r0))" -v rn="$((rn1 - rn0))" \
    -v d="$((d1 - d0))" -v dn="$((dn1 - dn0))" -v t="$T" \
    'BEGIN {printf "%.2f %s %s %s %.1f\n", g, sn ? sprintf("%.0f", s / sn) : "-", dn ? sprintf("%.0f", d / sn) : "-",
            rn ? sprintf("%.0f", r / rn) : "-", 100 * (s + d + r) / (t * 1e9)}'
}
sysctl -qw kernel.bpf_stats_enabled=1
SP=$(timed_udp_run 5303) ST=$(timed_udp_run 5203) SU=$(timed_udp_run 5204)
ip netns exec $C ethtool -K sfbt0 tx off >/dev/null
SPC=$(timed_udp_run 5303) STC=$(timed_udp_run 5203) SUC=$(timed_udp_run 5204)
ip netns exec $C ethtool -K sfbt0 tx on >/dev/null
sysctl -qw kernel.bpf_stats_enabled="$STATS_WAS"
rr_plain=$(rr_run 5305)
rr_fun=$(rr_run 5205)

# median and range of a column of numbers
stats() { sort -g | awk '{v[NR] = $1} END {m = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%s %s %s\n", m, v[1], v[NR]}'; }
ratios() { # $1: name of the funneled array, $2: name of the plain array
  local -n f=$1 b=$2
  for ((r = 0; r < ROUNDS; r++)); do awk -v a="${f[r]%% *}" -v b="${b[r]%% *}" 'BEGIN {print 100 * a / b}'; done | stats
}
cpu_ratios() { # CPU time per bit, funneled against plain, per round: $1, $2 as above
  local -n f=$1 b=$2
  for ((r = 0; r < ROUNDS; r++)); do
    read -r fg fb _ <<<"${f[r]}"; read -r bg bb _ <<<"${b[r]}"
    awk -v fg="$fg" -v fb="$fb" -v bg="$bg" -v bb="$bb" 'BEGIN {print (fb / fg) / (bb / bg)}'
  done | stats
}
gbit() { local -n a=$1; for x in "${a[@]}"; do echo "${x%% *}"; done | stats; }
loss() { local -n a=$1; for x in "${a[@]}"; do read -r _ _ l _ <<<"$x"; echo "$l"; done | sort -g | tail -1; }
drops() { local -n a=$1; for x in "${a[@]}"; do read -r _ _ _ d <<<"$x"; echo "$d"; done | sort -g | tail -1; }
row() { # label, array, plain array (or "" for the plain row), loss column, backlog drops column
  read -r m lo hi < <(gbit "$2")
  if [ -z "$3" ]; then
    rat="100%" cpu="1"
  else
    read -r rm rlo rhi < <(ratios "$2" "$3"); rat=$(printf '%.0f%% (%.0f-%.0f)' "$rm" "$rlo" "$rhi")
    read -r cm _ < <(cpu_ratios "$2" "$3"); cpu=$(printf '%.2f' "$cm")
  fi
  printf '%-34s %6.2f (%.2f-%.2f) %16s %9s %8s %9s\n' "$1" "$m" "$lo" "$hi" "$rat" "$4" "$cpu" "${5:--}"
}
printf '%-34s %20s %16s %9s %8s %9s\n' "flow" "Gbit/s" "of plain" "max loss" "CPU/bit" "backlog"
row "plain TCP" P "" "-"
row "TCP over TCP (funneled)" TT P "-"
row "TCP over UDP (funneled)" TU P "-"
row "  the same, DETOUR_RETURN=transmit" TTX P "-"
row "  (TCP over UDP)" TUX P "-"
row "  the same, DETOUR_CPUS=sender" TTS P "-"
row "  (TCP over UDP)" TUS P "-"
row "plain UDP, 1400 B, unpaced" UP "" "$(loss UP)%" "$(drops UP)"
row "UDP over TCP (funneled)" UT UP "$(loss UT)%" "$(drops UT)"
row "UDP over UDP (funneled)" UU UP "$(loss UU)%" "$(drops UU)"
row "  the same, DETOUR_CPUS=sender" UTS UP "$(loss UTS)%" "$(drops UTS)"
row "  (UDP over UDP)" UUS UP "$(loss UUS)%" "$(drops UUS)"
row "plain UDP, sender tx off" UPC "" "$(loss UPC)%" "$(drops UPC)"
row "UDP over TCP, in place (tx off)" UTC UPC "$(loss UTC)%" "$(drops UTC)"
row "UDP over UDP, in place (tx off)" UUC UPC "$(loss UUC)%" "$(drops UUC)"
row "IPv6: plain TCP" P6 "" "-"
row "IPv6: TCP over TCP (funneled)" TT6 P6 "-"
row "IPv6: TCP over UDP (funneled)" TU6 P6 "-"
row "IPv6: plain UDP, 1400 B, unpaced" UP6 "" "$(loss UP6)%" "$(drops UP6)"
row "IPv6: UDP over TCP (funneled)" UT6 UP6 "$(loss UT6)%" "$(drops UT6)"
row "IPv6: UDP over UDP (funneled)" UU6 UP6 "$(loss UU6)%" "$(drops UU6)"
printf '%-34s %6.2f %29s %9s\n' "plain UDP, 1400 B at $UDP_RATE" "$pu" "100%" "$pul%"
printf '%-34s %6.2f %29s %9s\n' "UDP over TCP (funneled)" "$tu1" "$(awk -v a="$tu1" -v b="$pu" 'BEGIN {printf "%.0f%%", 100 * a / b}')" "$tul%"
printf '%-34s %6.2f %29s %9s\n' "UDP over UDP (funneled)" "$uu1" "$(awk -v a="$uu1" -v b="$pu" 'BEGIN {printf "%.0f%%", 100 * a / b}')" "$uul1%"
printf '%-34s %6s %29s\n' "request/response, plain (per s)" "$rr_plain" "100%"
printf '%-34s %6s %29s\n' "request/response, funneled both ways" "$rr_fun" "$(awk -v a="$rr_fun" -v b="$rr_plain" 'BEGIN {printf "%.0f%%", 100 * a / b}')"
echo
printf 'time in sfunnel'"'"'s programs, unpaced UDP over IPv4, one more run each (kernel.bpf_stats_enabled;\n'
printf 'the counting adds to each figure): ns per packet at the sender (egress), in its detour, and at the\n'
printf 'receiver (ingress), and the three as a share of the run: here one CPU carries the whole flow\n'
printf '%-34s %6s %10s %10s %12s %10s\n' "flow" "Gbit/s" "sender ns" "detour ns" "receiver ns" "of a CPU"
for x in "plain UDP (no rule matches)|$SP" "UDP over TCP (funneled)|$ST" "UDP over UDP (funneled)|$SU" \
  "plain UDP, sender tx off|$SPC" "UDP over TCP, in place (tx off)|$STC" "UDP over UDP, in place (tx off)|$SUC"; do
  read -r g sn dn rn share <<<"${x#*|}"
  printf '%-34s %6.2f %10s %10s %12s %9s%%\n' "${x%%|*}" "$g" "$sn" "$dn" "$rn" "$share"
done
echo
echo "bulk TCP over TCP: $(bulk_run 5211)"
echo "bulk TCP over UDP: $(bulk_run 5212)"
echo "server TcpInCsumErrors + UdpInCsumErrors + Udp6InCsumErrors over the whole run: $(csum_errors)"
