/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The funnel and unfunnel rewrites (wire format of sfunnel 0.0.11; see
 * docs/design.md).  Each returns FUNNEL_OK when the packet was rewritten, a
 * FUNNEL_SKIP_* reason when it was left exactly as it was, and
 * FUNNEL_BROKEN when a helper failed after the packet had changed (the
 * caller must drop it).
 *
 * Checksums without reading the payload (see docs/design.md, "Wire format"):
 *  - the inner L4 checksum moves between the real and the zero-address
 *    pseudo-header with bpf_l4_csum_replace(BPF_F_PSEUDO_HDR), which is
 *    right whether the skb is CHECKSUM_PARTIAL (the field holds the seed)
 *    or complete;
 *  - a segment with a valid checksum sums to the complement of its
 *    pseudo-header, so the funnel header's checksum follows from the
 *    header, the outer pseudo-header and the inner length alone.
 * Only an inner UDP datagram sent without a checksum has its payload
 * summed.
 *
 * IPv6 is funneled the same way, the header inserted right after the fixed
 * 40-byte header (packets with extension headers never get here, parse.h);
 * both pseudo-headers sum the same words once the addresses are summed
 * (pkt.addr_sum), so the arithmetic is shared.
 *
 * The IPv4 header is edited in place with RFC 1624 updates: a header whose
 * checksum stays valid keeps its sum, so skb->csum (CHECKSUM_COMPLETE on
 * ingress) stays right.  Bytes that change the sum (the IPv6 header's, which
 * has no checksum) go through helpers that keep skb->csum in step.
 */
#ifndef SFUNNEL_FUNNEL_H
#define SFUNNEL_FUNNEL_H

#include <stddef.h>
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include "csum.h"
#include "parse.h"

enum funnel_result {
	FUNNEL_OK = 0,
	FUNNEL_SKIP_MALFORMED = 1, /* the packet cannot carry the rewrite */
	FUNNEL_SKIP_TOO_BIG = 2,   /* tot_len would overflow */
	FUNNEL_SKIP_ERROR = 3,     /* a helper failed before any change */
	FUNNEL_BROKEN = -1,        /* a helper failed after a change */
};

#define IP_OPTS_MAX (IPV4_MAX_HLEN - sizeof(struct iphdr))
#define OPTS_BUF 64 /* a power of two no smaller than IP_OPTS_MAX */
#define FUNNEL_SEQ 0xCAFEBABE
#define FUNNEL_ACK 0xBABECAFE
#define FUNNEL_WINDOW 1024
#define FUNNEL_DOFF_FLAGS 0x5002 /* data offset 5, SYN */

static __always_inline __u32 l4_csum_off(__u8 proto)
{
	return proto == IPPROTO_TCP ? offsetof(struct tcphdr, check) : offsetof(struct udphdr, check);
}

/* The length of a bare TCP or UDP header: what funnel inserts. */
static __always_inline __u32 l4_hdr_len(__u8 proto)
{
	return proto == IPPROTO_TCP ? sizeof(struct tcphdr) : sizeof(struct udphdr);
}

/*
 * Moves the IPv4 options (if any): bpf_skb_adjust_room(NET) adds or
 * removes room right after the fixed 20-byte header, but the L4 header
 * belongs after the options.  BPF_F_RECOMPUTE_CSUM keeps skb->csum right.
 */
static __always_inline int move_ip_options(struct __sk_buff *skb, __u32 l3, __u32 ihl_len,
					   __u32 from_delta, __u32 to_delta)
{
	__u8 opts[OPTS_BUF];
	__u32 n = ihl_len - sizeof(struct iphdr);
	__u32 base = l3 + sizeof(struct iphdr);

	if (n == 0 || n > IP_OPTS_MAX)
		return -1;
	/* Verifier workaround: clang may test a copy of n and pass another
	 * (6.1 then sees an unbounded length).  Masked into 1..OPTS_BUF here,
	 * n keeps its value (1..40) and every verifier sees the bound. */
	n = ((n - 1) & (OPTS_BUF - 1)) + 1;
	if (bpf_skb_load_bytes(skb, base + from_delta, opts, n))
		return -1;
	return bpf_skb_store_bytes(skb, base + to_delta, opts, n, BPF_F_RECOMPUTE_CSUM);
}

/*
 * Sets the IPv6 next header and payload length in place.  IPv6 has no
 * header checksum to keep the header's sum as it was, so the change in
 * the sum goes into skb->csum (bpf_csum_update: a no-op unless the skb
 * carries a complete checksum, as on ingress).
 */
static __always_inline int set_ipv6_proto_len(struct __sk_buff *skb, __u8 proto, __u32 l4_len)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ipv6hdr *ip6 = data + ETH_HLEN;

	if ((void *)(ip6 + 1) > data_end)
		return -1;
	/* payload_len, and the word of nexthdr and hop_limit. */
	__be16 *w = (__be16 *)&ip6->payload_len;
	__be16 old_len = w[0], old_nh = w[1];

	ip6->payload_len = bpf_htons(l4_len);
	ip6->nexthdr = proto;
	bpf_csum_update(skb, (__u16)~old_len + (__u32)w[0] + (__u16)~old_nh + (__u32)w[1]);
	return 0;
}

/*
 * Sets the IP protocol (IPv6: next header) and the length for an L4 part of
 * `l4_len` bytes.  An IPv4 header is edited in place, its checksum kept
 * valid.
 */
static __always_inline int set_ip_proto_len(struct __sk_buff *skb, const struct pkt *p, __u8 proto, __u32 l4_len)
{
	if (p->family == SFUNNEL_FAMILY_IPV6)
		return set_ipv6_proto_len(skb, proto, l4_len);

	__u16 tot_len = p->ihl_len + l4_len;
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + ETH_HLEN;

	if ((void *)(ip + 1) > data_end)
		return -1;
	__be16 old_len = ip->tot_len, new_len = bpf_htons(tot_len);
	/* protocol is the odd byte of its 16-bit word: bpf_htons() puts it there. */
	__be16 old_proto = bpf_htons(ip->protocol), new_proto = bpf_htons(proto);
	__sum16 check = csum_replace16(ip->check, old_len, new_len);

	ip->check = csum_replace16(check, old_proto, new_proto);
	ip->tot_len = new_len;
	ip->protocol = proto;
	return 0;
}

/* Moves the inner L4 checksum's pseudo-header to (add) or from zero addresses. */
static __always_inline int inner_csum_addrs(struct __sk_buff *skb, const struct pkt *p,
					    __u32 inner_l4, __u8 inner_proto, int add)
{
	__u32 sum = p->addr_sum;
	__u32 diff = add ? sum : ~sum;
	__u64 flags = BPF_F_PSEUDO_HDR;

	/* BPF_F_MARK_MANGLED_0: a UDP checksum of 0 ("none") stays 0, and a
	 * computed 0 is written as 0xffff. */
	if (inner_proto == IPPROTO_UDP)
		flags |= BPF_F_MARK_MANGLED_0;
	return bpf_l4_csum_replace(skb, inner_l4 + l4_csum_off(inner_proto), 0, diff, flags);
}

/*
 * Writes the funnel header into the room adjust_room made.  Without IP
 * options that room is zeroed and linear: a direct store, plus the header's
 * sum into skb->csum when the skb carries a complete one (bpf_csum_update
 * is a no-op otherwise).  With options the room holds their old bytes, so
 * the store goes through the helper that keeps skb->csum in step.
 */
static __always_inline int write_funnel_header(struct __sk_buff *skb, const struct pkt *p, void *hdr,
					       __u32 len, __u32 hdr_sum)
{
	/* Verifier workaround: a bounded offset for direct access. */
	__u32 l4 = p->l4;
	if (!p->opts_len && l4 <= ETH_HLEN + IPV6_HLEN) {
		void *data = (void *)(long)skb->data;
		void *data_end = (void *)(long)skb->data_end;
		void *at = data + l4;

		if (at + sizeof(struct tcphdr) <= data_end) {
			if (len == sizeof(struct tcphdr))
				__builtin_memcpy(at, hdr, sizeof(struct tcphdr));
			else
				__builtin_memcpy(at, hdr, sizeof(struct udphdr));
			bpf_csum_update(skb, hdr_sum);
			return 0;
		}
	}
	return bpf_skb_store_bytes(skb, p->l4, hdr, len, BPF_F_RECOMPUTE_CSUM);
}

static __always_inline int funnel(struct __sk_buff *skb, const struct pkt *p, __u8 proto,
				  __be16 sport, __be16 dport)
{
	__u32 hlen = l4_hdr_len(proto);
	__u32 inner_len = p->l4_len;
	__u32 new_l4_len = inner_len + hlen;

	/* IPv4's tot_len, or IPv6's payload_len, must still hold the length. */
	if ((p->family == SFUNNEL_FAMILY_IPV4 ? p->tot_len : p->l4_len) + hlen > 0xffff)
		return FUNNEL_SKIP_TOO_BIG;

	/* The inner segment's sum, before anything changes. */
	__u32 sum;
	if (p->proto == IPPROTO_UDP && p->l4_csum == 0) {
		int s = csum_skb_bytes(skb, p->l4, inner_len);
		if (s < 0)
			return FUNNEL_SKIP_ERROR;
		sum = s;
	} else {
		sum = csum_segment_zero_addrs(p->proto, inner_len);
	}
	/* The outer pseudo-header; the header's own words come below. */
	sum += p->addr_sum + csum_pseudo_proto_len(proto, new_l4_len);

	if (bpf_skb_adjust_room(skb, hlen, BPF_ADJ_ROOM_NET, 0))
		return FUNNEL_SKIP_ERROR;

	/* From here on the packet has changed: any failure is FUNNEL_BROKEN. */
	if (p->opts_len && move_ip_options(skb, p->l3, p->ihl_len, hlen, 0))
		return FUNNEL_BROKEN;
	if (!(p->proto == IPPROTO_UDP && p->l4_csum == 0) &&
	    inner_csum_addrs(skb, p, p->l4 + hlen, p->proto, 0))
		return FUNNEL_BROKEN;

	int err;
	if (proto == IPPROTO_TCP) {
		struct tcphdr th = {
			.source = sport,
			.dest = dport,
			.seq = bpf_htonl(FUNNEL_SEQ),
			.ack_seq = bpf_htonl(FUNNEL_ACK),
			.doff = sizeof(struct tcphdr) / 4,
			.syn = 1,
			.window = bpf_htons(FUNNEL_WINDOW),
		};
		__u32 hdr_sum = sport + dport + csum_word32(th.seq) + csum_word32(th.ack_seq) +
				bpf_htons(FUNNEL_DOFF_FLAGS) + th.window;
		th.check = ~csum_fold(sum + hdr_sum);
		err = write_funnel_header(skb, p, &th, sizeof(th), hdr_sum + th.check);
	} else {
		struct udphdr uh = {
			.source = sport,
			.dest = dport,
			.len = bpf_htons(new_l4_len),
		};
		__u32 hdr_sum = sport + dport + uh.len;
		uh.check = ~csum_fold(sum + hdr_sum);
		if (uh.check == 0)
			uh.check = 0xffff;
		err = write_funnel_header(skb, p, &uh, sizeof(uh), hdr_sum + uh.check);
	}
	if (err || set_ip_proto_len(skb, p, proto, new_l4_len))
		return FUNNEL_BROKEN;
	bpf_set_hash_invalid(skb);
	return FUNNEL_OK;
}

/* The inner L4 checksum field, from linear data if it is there. */
static __always_inline int read_inner_csum(struct __sk_buff *skb, __u32 off, __be16 *csum)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	/* Verifier workaround: a bounded offset for direct access. */
	if (off < 1024) {
		__be16 *f = data + off;
		if ((void *)(f + 1) <= data_end) {
			*csum = *f;
			return 0;
		}
	}
	return bpf_skb_load_bytes(skb, off, csum, sizeof(*csum));
}

static __always_inline int unfunnel(struct __sk_buff *skb, const struct pkt *p, __u8 inner_proto)
{
	__u32 hlen = p->l4_hlen;
	__u32 inner_min = l4_hdr_len(inner_proto);
	__be16 inner_csum;

	/* The inner header must be there in full. */
	if (p->l4_len < hlen + inner_min)
		return FUNNEL_SKIP_MALFORMED;
	/* 0 means an inner UDP datagram sent without a checksum. */
	if (read_inner_csum(skb, p->l4 + hlen + l4_csum_off(inner_proto), &inner_csum))
		return FUNNEL_SKIP_ERROR;

	if (p->opts_len) {
		/* Options first, over the funnel header; then the room goes. */
		if (move_ip_options(skb, p->l3, p->ihl_len, 0, hlen))
			return FUNNEL_SKIP_ERROR;
		if (bpf_skb_adjust_room(skb, -(__s32)hlen, BPF_ADJ_ROOM_NET, 0))
			return FUNNEL_BROKEN;
	} else if (bpf_skb_adjust_room(skb, -(__s32)hlen, BPF_ADJ_ROOM_NET, 0)) {
		return FUNNEL_SKIP_ERROR;
	}

	if (set_ip_proto_len(skb, p, inner_proto, p->l4_len - hlen))
		return FUNNEL_BROKEN;
	if (!(inner_proto == IPPROTO_UDP && inner_csum == 0) &&
	    inner_csum_addrs(skb, p, p->l4, inner_proto, 1))
		return FUNNEL_BROKEN;
	bpf_set_hash_invalid(skb);
	return FUNNEL_OK;
}

#endif /* SFUNNEL_FUNNEL_H */
