/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The funnel and unfunnel rewrites (wire format of sfunnel 0.0.11; see the
 * README).  Each returns 0 when the packet was rewritten, FUNNEL_UNTOUCHED
 * when it was left exactly as it was, and FUNNEL_BROKEN when a helper
 * failed after the packet was already changed (the caller must drop it).
 */
#ifndef SFUNNEL_FUNNEL_H
#define SFUNNEL_FUNNEL_H

#include <stddef.h>
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include "csum.h"
#include "parse.h"

#define FUNNEL_UNTOUCHED 1
#define FUNNEL_BROKEN (-1)

#define IP_OPTS_MAX (IPV4_MAX_HLEN - sizeof(struct iphdr))
#define FUNNEL_SEQ 0xCAFEBABE
#define FUNNEL_ACK 0xBABECAFE
#define FUNNEL_WINDOW 1024

static __always_inline __u32 l4_csum_off(__u8 proto)
{
	return proto == IPPROTO_TCP ? offsetof(struct tcphdr, check) : offsetof(struct udphdr, check);
}

/*
 * Moves the IPv4 options (if any) `delta` bytes: bpf_skb_adjust_room(NET)
 * adds or removes room right after the fixed 20-byte header, but the L4
 * header belongs after the options.
 */
static __always_inline int move_ip_options(struct __sk_buff *skb, __u32 l3, __u32 ihl_len,
					   __u32 from_delta, __u32 to_delta)
{
	__u8 opts[IP_OPTS_MAX];
	__u32 n = ihl_len - sizeof(struct iphdr);
	__u32 base = l3 + sizeof(struct iphdr);

	if (n == 0)
		return 0;
	/* Verifier workaround: restate that n fits the buffer. */
	if (n > IP_OPTS_MAX)
		return -1;
	if (bpf_skb_load_bytes(skb, base + from_delta, opts, n))
		return -1;
	return bpf_skb_store_bytes(skb, base + to_delta, opts, n, 0);
}

/* Rewrites the IPv4 protocol and total length, keeping the header checksum. */
static __always_inline int set_ip_proto_len(struct __sk_buff *skb, const struct pkt *p, __u8 proto,
					    __u16 tot_len)
{
	__u32 csum_off = p->l3 + offsetof(struct iphdr, check);
	__be16 old_len = bpf_htons(p->tot_len), new_len = bpf_htons(tot_len);
	/* protocol shares a 16-bit word with ttl; replace only its byte. */
	__u8 old_proto = p->proto;

	if (bpf_l3_csum_replace(skb, csum_off, old_len, new_len, sizeof(__be16)))
		return -1;
	if (bpf_skb_store_bytes(skb, p->l3 + offsetof(struct iphdr, tot_len), &new_len,
				sizeof(new_len), 0))
		return -1;
	/* A byte at an odd offset in its word weighs as the low byte. */
	if (bpf_l3_csum_replace(skb, csum_off, bpf_htons(old_proto), bpf_htons(proto),
				sizeof(__be16)))
		return -1;
	return bpf_skb_store_bytes(skb, p->l3 + offsetof(struct iphdr, protocol), &proto,
				   sizeof(proto), 0);
}

/* Sum of saddr and daddr, as a checksum diff (memory byte order). */
static __always_inline __s64 addrs_sum(const struct pkt *p)
{
	__be32 addrs[2] = { p->saddr, p->daddr };

	return bpf_csum_diff(NULL, 0, addrs, sizeof(addrs), 0);
}

/* Moves the inner L4 checksum's pseudo-header to or from zero addresses. */
static __always_inline int inner_csum_addrs(struct __sk_buff *skb, const struct pkt *p,
					    __u32 inner_l4, __u8 inner_proto, int add)
{
	/* A UDP checksum of 0 means "none": it stays 0. */
	if (inner_proto == IPPROTO_UDP && p->l4_csum == 0 && !add)
		return 0;
	__s64 sum = addrs_sum(p);
	if (sum < 0)
		return -1;
	__u32 diff = add ? (__u32)sum : ~(__u32)sum;
	__u64 flags = BPF_F_PSEUDO_HDR;
	if (inner_proto == IPPROTO_UDP)
		flags |= BPF_F_MARK_MANGLED_0;
	return bpf_l4_csum_replace(skb, inner_l4 + l4_csum_off(inner_proto), 0, diff, flags);
}

static __always_inline int funnel(struct __sk_buff *skb, const struct pkt *p, __u8 proto,
				  __be16 sport, __be16 dport)
{
	__u32 hlen = proto == IPPROTO_TCP ? sizeof(struct tcphdr) : sizeof(struct udphdr);
	__u32 inner_len = p->l4_len;
	__u32 new_l4_len = inner_len + hlen;

	if (p->tot_len + hlen > 0xffff)
		return FUNNEL_UNTOUCHED;

	/* The inner segment's sum, before anything changes. */
	__u16 inner_sum;
	if (p->proto == IPPROTO_UDP && p->l4_csum == 0) {
		__s64 s = csum_skb_bytes(skb, p->l4, inner_len);
		if (s < 0)
			return FUNNEL_UNTOUCHED;
		inner_sum = (__u16)s;
	} else {
		inner_sum = csum_segment_zero_addrs(p->proto, inner_len);
	}

	if (bpf_skb_adjust_room(skb, hlen, BPF_ADJ_ROOM_NET, 0))
		return FUNNEL_UNTOUCHED;

	/* From here on the packet has changed: any failure is FUNNEL_BROKEN. */
	if (move_ip_options(skb, p->l3, p->ihl_len, hlen, 0))
		return FUNNEL_BROKEN;
	if (inner_csum_addrs(skb, p, p->l4 + hlen, p->proto, 0))
		return FUNNEL_BROKEN;
	if (set_ip_proto_len(skb, p, proto, p->tot_len + hlen))
		return FUNNEL_BROKEN;

	struct pseudo_hdr4 ph = {
		.saddr = p->saddr,
		.daddr = p->daddr,
		.proto = proto,
		.len = bpf_htons(new_l4_len),
	};
	__s64 sum = bpf_csum_diff(NULL, 0, (__be32 *)&ph, sizeof(ph), inner_sum);
	if (sum < 0)
		return FUNNEL_BROKEN;

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
		sum = bpf_csum_diff(NULL, 0, (__be32 *)&th, sizeof(th), (__u32)sum);
		if (sum < 0)
			return FUNNEL_BROKEN;
		th.check = ~csum_fold((__u32)sum);
		if (bpf_skb_store_bytes(skb, p->l4, &th, sizeof(th), 0))
			return FUNNEL_BROKEN;
	} else {
		struct udphdr uh = {
			.source = sport,
			.dest = dport,
			.len = bpf_htons(new_l4_len),
		};
		/* udphdr is 8 bytes: a multiple of 4, as csum_diff needs. */
		sum = bpf_csum_diff(NULL, 0, (__be32 *)&uh, sizeof(uh), (__u32)sum);
		if (sum < 0)
			return FUNNEL_BROKEN;
		uh.check = ~csum_fold((__u32)sum);
		if (uh.check == 0)
			uh.check = 0xffff;
		if (bpf_skb_store_bytes(skb, p->l4, &uh, sizeof(uh), 0))
			return FUNNEL_BROKEN;
	}
	bpf_set_hash_invalid(skb);
	return 0;
}

static __always_inline int unfunnel(struct __sk_buff *skb, const struct pkt *p, __u8 inner_proto)
{
	__u32 hlen = p->l4_hlen;
	__u32 inner_min = inner_proto == IPPROTO_TCP ? sizeof(struct tcphdr) : sizeof(struct udphdr);

	/* The inner header must be there in full. */
	if (p->l4_len < hlen + inner_min)
		return FUNNEL_UNTOUCHED;

	/* Read the inner checksum now: 0 means an inner UDP sent without one. */
	struct pkt inner = *p;
	if (bpf_skb_load_bytes(skb, p->l4 + hlen + l4_csum_off(inner_proto), &inner.l4_csum,
			       sizeof(inner.l4_csum)))
		return FUNNEL_UNTOUCHED;

	if (p->ihl_len > sizeof(struct iphdr)) {
		/* Options first, over the funnel header; then the room goes. */
		if (move_ip_options(skb, p->l3, p->ihl_len, 0, hlen))
			return FUNNEL_UNTOUCHED;
		if (bpf_skb_adjust_room(skb, -(__s32)hlen, BPF_ADJ_ROOM_NET, 0))
			return FUNNEL_BROKEN;
	} else if (bpf_skb_adjust_room(skb, -(__s32)hlen, BPF_ADJ_ROOM_NET, 0)) {
		return FUNNEL_UNTOUCHED;
	}

	if (set_ip_proto_len(skb, p, inner_proto, p->tot_len - hlen))
		return FUNNEL_BROKEN;
	if (inner.l4_csum != 0 || inner_proto == IPPROTO_TCP) {
		if (inner_csum_addrs(skb, &inner, p->l4, inner_proto, 1))
			return FUNNEL_BROKEN;
	}
	bpf_set_hash_invalid(skb);
	return 0;
}

#endif /* SFUNNEL_FUNNEL_H */
