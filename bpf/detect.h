/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Recognising funneled packets by what NATs keep, not by the funnel
 * header's ports (which a NAT may rewrite).  See the README, "funneled".
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
 * Which inner protocols the bytes after the outer header (TCP of 20 bytes,
 * as funnel writes it, or UDP) fit: FIT_UDP when the inner UDP length
 * field equals the remaining length and the checksum verifies (or is 0),
 * FIT_TCP when the inner data offset is >= 5 and fits and the checksum
 * verifies.  Both checksums cannot verify at once (their pseudo-headers
 * differ in the protocol), so FIT_UDP | FIT_TCP needs an inner UDP
 * checksum of 0.
 */
static __always_inline __u32 inner_fits(struct __sk_buff *skb, const struct pkt *p)
{
	__u32 outer_hlen = p->l4_hlen;
	__u32 inner_len = p->l4_len - outer_hlen; /* parse: l4_hlen <= l4_len */
	__u8 outer[sizeof(struct tcphdr)];
	__u8 inner[sizeof(struct tcphdr)];
	__s64 hsum;

	if (inner_len < sizeof(struct udphdr) || inner_len > 0xffff)
		return 0;
	if (p->proto == IPPROTO_TCP) {
		if (outer_hlen != sizeof(struct tcphdr))
			return 0;
		if (bpf_skb_load_bytes(skb, p->l4, outer, sizeof(struct tcphdr)))
			return 0;
		hsum = bpf_csum_diff(NULL, 0, (__be32 *)outer, sizeof(struct tcphdr), 0);
	} else {
		if (p->l4_csum == 0)
			return 0;
		if (bpf_skb_load_bytes(skb, p->l4, outer, sizeof(struct udphdr)))
			return 0;
		hsum = bpf_csum_diff(NULL, 0, (__be32 *)outer, sizeof(struct udphdr), 0);
	}
	if (hsum < 0)
		return 0;
	__u64 osum = (__u32)hsum + csum_word32(p->saddr) + csum_word32(p->daddr) +
		     csum_pseudo_proto_len(p->proto, p->l4_len);

	__u32 at = p->l4 + outer_hlen, fits = 0;
	if (inner_len >= sizeof(struct tcphdr)) {
		if (bpf_skb_load_bytes(skb, at, inner, sizeof(struct tcphdr)))
			return 0;
		__u32 doff = (inner[12] >> 4) * 4;
		if (doff >= sizeof(struct tcphdr) && doff <= inner_len &&
		    outer_csum_implies(osum, IPPROTO_TCP, inner_len))
			fits |= FIT_TCP;
	} else if (bpf_skb_load_bytes(skb, at, inner, sizeof(struct udphdr))) {
		return 0;
	}
	struct udphdr *uh = (void *)inner;
	if (uh->len == bpf_htons(inner_len) &&
	    (uh->check == 0 || outer_csum_implies(osum, IPPROTO_UDP, inner_len)))
		fits |= FIT_UDP;
	return fits;
}

/* The TCP funnel header's fixed fields, in network order. */
static __always_inline int tcp_magic(struct __sk_buff *skb, const struct pkt *p)
{
	struct tcphdr th;

	if (p->l4_hlen != sizeof(struct tcphdr))
		return 0;
	if (bpf_skb_load_bytes(skb, p->l4, &th, sizeof(th)))
		return 0;
	return th.seq == bpf_htonl(FUNNEL_SEQ) && th.ack_seq == bpf_htonl(FUNNEL_ACK) &&
	       ((__be16 *)&th)[6] == bpf_htons(FUNNEL_DOFF_FLAGS) && th.window == bpf_htons(FUNNEL_WINDOW);
}

/* The `funneled` match (lookup.h): TCP by the magic fields, UDP by a
 * plausible inner header (inner_fits). */

#endif /* SFUNNEL_DETECT_H */
