/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Recognising funneled packets by what NATs keep, not by the funnel
 * header's ports (which a NAT may rewrite).  See docs/rules.md, "Recognising funneled packets".
 *
 *  - A TCP funnel header has fixed fields: seq 0xCAFEBABE, ack 0xBABECAFE,
 *    data offset 5, flags SYN only, window 1024.  No NAT touches them.
 *  - Behind either header, the inner segment's checksum is valid for the
 *    zero-address pseudo-header.  A segment with a valid checksum sums to
 *    the complement of its pseudo-header, so "the inner checksum verifies"
 *    is, given a valid outer checksum, "the outer checksum is the one a
 *    funnel of an inner P segment of this length writes": header fields
 *    only, no payload read, and right also when the inner checksum is still
 *    pending (CHECKSUM_PARTIAL).  Every funnel header carries a complete
 *    checksum and NATs keep it valid; an outer UDP checksum of 0 ("none")
 *    gives nothing to go on, so such a packet fits nothing.
 *  - An inner UDP datagram sent without a checksum (0) fits UDP by its
 *    length field alone.
 */
#ifndef SFUNNEL_DETECT_H
#define SFUNNEL_DETECT_H

#include "csum.h"
#include "funnel.h"
#include "parse.h"

#define FIT_UDP 0x1
#define FIT_TCP 0x2

/* True when the outer segment's checksum is valid on the assumption that
 * the inner segment (inner_proto, inner_len) verifies with zero addresses.
 * `outer` is the sum of the outer pseudo-header and header. */
static __always_inline int outer_csum_implies(__u64 outer, __u8 inner_proto, __u32 inner_len)
{
	return csum_fold(outer + csum_segment_zero_addrs(inner_proto, inner_len)) == 0xffff;
}

/*
 * Verifier workaround: the tests below are global functions.  The verifier
 * checks a global function once, on its own, instead of once per caller
 * state, and its result is an unknown scalar to the caller, so the funneled
 * bit and the auto decision do not split the rest of the program into
 * constant cases (inlined, they made the program take 7 times as long to
 * load).  A global function's arguments are scalars or the context, so
 * what it needs of struct pkt comes packed:
 *   at     = l4 | l4_csum << 16   (offset of the outer L4 header, its checksum)
 *   lens   = l4_len | l4_hlen << 16 | proto << 24
 *   addrs  = the addresses' sum (pkt.addr_sum), of either family
 */
static __always_inline __u32 fits_at(const struct pkt *p)
{
	return p->l4 | (__u32)p->l4_csum << 16;
}

static __always_inline __u32 fits_lens(const struct pkt *p)
{
	return p->l4_len | (__u32)p->l4_hlen << 16 | (__u32)p->proto << 24;
}

static __always_inline __u32 fits_addrs(const struct pkt *p)
{
	return p->addr_sum;
}

/*
 * Which inner protocols the bytes after the outer header (TCP of 20 bytes,
 * as funnel writes it, or UDP) fit: FIT_UDP when the inner UDP length
 * field equals the remaining length and the checksum verifies (or is 0),
 * FIT_TCP when the inner data offset is >= 5 and fits and the checksum
 * verifies.  Both checksums cannot verify at once (their pseudo-headers
 * differ in the protocol), so FIT_UDP | FIT_TCP needs an inner UDP
 * checksum of 0.
 */
__noinline int sfunnel_inner_fits(struct __sk_buff *skb, __u32 at, __u32 lens, __u32 addrs)
{
	__u32 l4 = at & 0xffff, l4_len = lens & 0xffff, outer_hlen = (lens >> 16) & 0xff;
	__u8 proto = lens >> 24;
	__be16 outer_csum = at >> 16;
	__u8 outer[sizeof(struct tcphdr)];
	__u8 inner[sizeof(struct tcphdr)];
	__s64 hsum;

	if (!skb || outer_hlen > l4_len)
		return 0;
	__u32 inner_len = l4_len - outer_hlen;
	if (inner_len < sizeof(struct udphdr))
		return 0;
	if (proto == IPPROTO_TCP) {
		if (outer_hlen != sizeof(struct tcphdr))
			return 0;
		if (bpf_skb_load_bytes(skb, l4, outer, sizeof(struct tcphdr)))
			return 0;
		hsum = bpf_csum_diff(NULL, 0, (__be32 *)outer, sizeof(struct tcphdr), 0);
	} else if (proto == IPPROTO_UDP) {
		if (outer_hlen != sizeof(struct udphdr) || outer_csum == 0)
			return 0;
		if (bpf_skb_load_bytes(skb, l4, outer, sizeof(struct udphdr)))
			return 0;
		hsum = bpf_csum_diff(NULL, 0, (__be32 *)outer, sizeof(struct udphdr), 0);
	} else {
		return 0;
	}
	if (hsum < 0)
		return 0;
	__u64 osum = (__u32)hsum + addrs + csum_pseudo_proto_len(proto, l4_len);

	__u32 in_at = l4 + outer_hlen;
	int fits = 0;
	if (inner_len >= sizeof(struct tcphdr)) {
		if (bpf_skb_load_bytes(skb, in_at, inner, sizeof(struct tcphdr)))
			return 0;
		__u32 doff = (inner[12] >> 4) * 4;
		if (doff >= sizeof(struct tcphdr) && doff <= inner_len &&
		    outer_csum_implies(osum, IPPROTO_TCP, inner_len))
			fits |= FIT_TCP;
	} else if (bpf_skb_load_bytes(skb, in_at, inner, sizeof(struct udphdr))) {
		return 0;
	}
	struct udphdr *uh = (void *)inner;
	if (uh->len == bpf_htons(inner_len) &&
	    (uh->check == 0 || outer_csum_implies(osum, IPPROTO_UDP, inner_len)))
		fits |= FIT_UDP;
	return fits;
}

/* `unfunnel auto`: the inner protocol if exactly one fits, else 0. */
__noinline int sfunnel_auto_proto(struct __sk_buff *skb, __u32 at, __u32 lens, __u32 addrs)
{
	int fits = sfunnel_inner_fits(skb, at, lens, addrs);

	if (fits == FIT_UDP)
		return IPPROTO_UDP;
	if (fits == FIT_TCP)
		return IPPROTO_TCP;
	return 0;
}

/* The TCP funnel header's fixed fields, in network order: 1 or 0. */
__noinline int sfunnel_tcp_magic(struct __sk_buff *skb, __u32 l4)
{
	struct tcphdr th;

	if (!skb || bpf_skb_load_bytes(skb, l4 & 0xffff, &th, sizeof(th)))
		return 0;
	return th.seq == bpf_htonl(FUNNEL_SEQ) && th.ack_seq == bpf_htonl(FUNNEL_ACK) &&
	       ((__be16 *)&th)[6] == bpf_htons(FUNNEL_DOFF_FLAGS) && th.window == bpf_htons(FUNNEL_WINDOW);
}

/* The `funneled` match: TCP by the fixed fields, UDP by a plausible inner
 * header (sfunnel_inner_fits).  0 or 1, branch-free for the caller. */
static __always_inline __u8 looks_funneled(struct __sk_buff *skb, const struct pkt *p)
{
	int r;

	if (p->proto == IPPROTO_TCP)
		r = sfunnel_tcp_magic(skb, p->l4);
	else
		r = sfunnel_inner_fits(skb, fits_at(p), fits_lens(p), fits_addrs(p));
	return (r | r >> 1) & 1;
}

#endif /* SFUNNEL_DETECT_H */
