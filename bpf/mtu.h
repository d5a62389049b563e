/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The MTU guard: a packet that funneling would push past the MTU is not
 * funneled.  By default it is dropped, and when its DF bit is set the
 * sender gets an ICMP "fragmentation needed" naming the MTU less the
 * funnel header, so path MTU discovery shrinks its packets until they fit
 * funneled; an IPv6 sender always gets an ICMPv6 "packet too big".  With
 * SFUNNEL_PARAMS_OVER_MTU_PASS it is passed unfunneled instead.
 *
 * Which MTU:
 *  - egress: the device this program is attached to (bpf_check_mtu);
 *  - ingress: the device the packet will be routed out of (bpf_fib_lookup
 *    with the funneled length).  A packet for this host is never over.
 * A GSO packet passes: the segmentation detour (detour.h) cuts its
 * segments to fit, against the same MTU.
 *
 * Nothing here runs unless a funnel rule matched, and the check is one
 * helper call: packets that fit pay for nothing else.
 */
#ifndef SFUNNEL_MTU_H
#define SFUNNEL_MTU_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "csum.h"
#include "maps.h"
#include "parse.h"

/* Spelled out here: linux/icmp.h pulls in libc headers. */
#define SFUNNEL_AF_INET 2
#define SFUNNEL_AF_INET6 10
#define ICMPV6_PKT_TOOBIG 2
#define IPPROTO_ICMPV6_ 58
#define IP_DF_FLAG 0x4000 /* host order */
#define ICMP_DEST_UNREACH 3
#define ICMP_FRAG_NEEDED 4

/* ICMP "destination unreachable", code "fragmentation needed" (RFC 1191). */
struct icmp_frag_hdr {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	__be16 unused;
	__be16 mtu; /* next-hop MTU */
};

/*
 * The MTU of the route a packet of `len` bytes (IP header on) from `p`'s
 * source to its destination would take, arriving on `in_ifindex`, if
 * `len` exceeds it; 0 if it fits.  Local delivery, no route or forwarding
 * off: not our concern, 0.
 */
static __always_inline __u32 route_mtu_if_over(struct __sk_buff *skb, const struct pkt *p, __u32 len,
						__u32 in_ifindex)
{
	__u32 zero = 0;
	/* In the scratch map: on the stack it takes 64 of the 512 bytes. */
	struct bpf_fib_lookup *f = bpf_map_lookup_elem(&sf_scratch, &zero);
	_Static_assert(sizeof(*f) <= SCRATCH_SIZE, "the lookup must fit the scratch map");

	if (!f)
		return 0;
	__builtin_memset(f, 0, sizeof(*f));
	f->family = SFUNNEL_AF_INET;
	f->l4_protocol = p->proto;
	f->sport = bpf_htons(p->sport);
	f->dport = bpf_htons(p->dport);
	f->tot_len = len;
	f->ifindex = in_ifindex;
	if (p->family == SFUNNEL_FAMILY_IPV6) {
		f->family = SFUNNEL_AF_INET6;
		/* Both addresses: ipv6_src and ipv6_dst follow each other, as in the header. */
		if (bpf_skb_load_bytes(skb, p->l3 + IPV6_SADDR_OFF, f->ipv6_src, 2 * sizeof(f->ipv6_src)))
			return 0;
	} else {
		f->ipv4_src = p->saddr;
		f->ipv4_dst = p->daddr;
	}
	if (bpf_fib_lookup(skb, f, sizeof(*f), 0) == BPF_FIB_LKUP_RET_FRAG_NEEDED)
		return f->mtu_result;
	return 0;
}

/*
 * The MTU that the packet, `hlen` bytes longer, would exceed; 0 if it fits.
 * On egress (`egress`), that of the device `ifindex` (0: the one the
 * program runs on); on ingress, that of the route from the device
 * `ifindex` on.
 */
static __always_inline __u32 exceeds_mtu(struct __sk_buff *skb, const struct pkt *p, __u32 hlen, int egress,
					 __u32 ifindex)
{
	if (egress) {
		__u32 mtu = 0;

		/* len_diff is the header. */
		if (bpf_check_mtu(skb, ifindex, &mtu, hlen, 0) == BPF_MTU_CHK_RET_FRAG_NEEDED)
			return mtu;
		return 0;
	}
	return route_mtu_if_over(skb, p, p->tot_len + hlen, ifindex);
}

/*
 * The guard's check for a packet the main program is about to funnel.  A
 * GSO packet always fits here: the segmentation detour (detour.h) cuts its
 * segments to the MTU.
 */
static __always_inline __u32 funnel_exceeds_mtu(struct __sk_buff *skb, const struct pkt *p, __u32 hlen,
						 __u32 flags)
{
	if (skb->gso_size)
		return 0;
	if (flags & SFUNNEL_PARAMS_EGRESS)
		return exceeds_mtu(skb, p, hlen, 1, 0);
	return exceeds_mtu(skb, p, hlen, 0, skb->ingress_ifindex);
}

/*
 * The reply, laid out as it goes on the wire (RFC 792 / RFC 1191) from
 * `eth` on.  `align` puts the IP header on a 4-byte boundary of the stack.
 */
struct frag_needed {
	__u8 align[2];
	struct ethhdr eth;
	struct iphdr ip;
	struct icmp_frag_hdr icmp;
	__u8 quote[IPV4_MAX_HLEN + 8]; /* the IP header and 8 bytes of L4 */
};

/* Swaps the addresses in place: the reply goes back where the packet came
 * from. */
static __always_inline void swap_macs(struct ethhdr *eth)
{
	__u8 tmp[ETH_ALEN];

	__builtin_memcpy(tmp, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, tmp, ETH_ALEN);
}

/*
 * Makes the packet the `len` bytes of `reply` (from the Ethernet header
 * on) and returns the redirect verdict that delivers it to the sender: on
 * egress the sender is this host or behind it, so the reply enters the
 * attachment's device as if received; on ingress it leaves through the
 * device the packet came in on.  That device is `dev`, or for 0 the one
 * this program runs on.
 */
static __always_inline int send_reply(struct __sk_buff *skb, void *reply, __u32 len, __u32 flags, __u32 dev)
{
	if (bpf_skb_change_tail(skb, len, 0))
		return -1;
	if (bpf_skb_store_bytes(skb, 0, reply, len, BPF_F_RECOMPUTE_CSUM | BPF_F_INVALIDATE_HASH))
		return -1;
	return bpf_redirect(dev ? dev : skb->ifindex, flags & SFUNNEL_PARAMS_EGRESS ? BPF_F_INGRESS : 0);
}

/* ICMPv6 "packet too big" (RFC 4443 §3.2). */
struct icmp6_too_big_hdr {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	__be32 mtu;
};

/* The IPv6 reply, as it goes on the wire from `eth` on. */
struct too_big6 {
	__u8 align[2];
	struct ethhdr eth;
	struct ipv6hdr ip6;
	struct icmp6_too_big_hdr icmp;
	__u8 quote[IPV6_HLEN + 8]; /* the IPv6 header and 8 bytes of L4 */
};

/*
 * The IPv6 form of reply_frag_needed (below): an ICMPv6 "packet too big"
 * to the sender, whatever the packet (IPv6 has no DF bit: routers never
 * fragment).  Its quote is the IPv6 header and the first 8 bytes of L4,
 * which is what the sender's stack needs to find the socket.
 */
static __always_inline int reply_too_big6(struct __sk_buff *skb, const struct pkt *p, __u32 mtu, __u32 flags,
					  __u32 dev)
{
	__u32 zero = 0;
	struct too_big6 *r = bpf_map_lookup_elem(&sf_scratch, &zero);
	_Static_assert(sizeof(*r) <= SCRATCH_SIZE, "the reply must fit the scratch map");

	if (!r)
		return -1;
	if (bpf_skb_load_bytes(skb, 0, &r->eth, sizeof(r->eth)) ||
	    bpf_skb_load_bytes(skb, p->l3, r->quote, sizeof(r->quote)))
		return -1;
	swap_macs(&r->eth);
	r->eth.h_proto = bpf_htons(ETH_P_IPV6);
	/* Version 6, traffic class 0, flow label 0. */
	__builtin_memset(&r->ip6, 0, 4);
	r->ip6.version = 6;
	r->ip6.payload_len = bpf_htons(sizeof(r->icmp) + sizeof(r->quote));
	r->ip6.nexthdr = IPPROTO_ICMPV6_;
	r->ip6.hop_limit = 255;
	/* From the address the packet was for: on the path the sender knows. */
	__builtin_memcpy(&r->ip6.saddr, r->quote + IPV6_DADDR_OFF, sizeof(r->ip6.saddr));
	__builtin_memcpy(&r->ip6.daddr, r->quote + IPV6_SADDR_OFF, sizeof(r->ip6.daddr));
	r->icmp.type = ICMPV6_PKT_TOOBIG;
	r->icmp.code = 0;
	r->icmp.checksum = 0;
	r->icmp.mtu = bpf_htonl(mtu);
	/* The pseudo-header (addresses, length, next header), then the message. */
	__u64 sum = p->addr_sum + csum_pseudo_proto_len(IPPROTO_ICMPV6_, sizeof(r->icmp) + sizeof(r->quote));
	__s64 body = bpf_csum_diff(0, 0, (__be32 *)&r->icmp, sizeof(r->icmp) + sizeof(r->quote), 0);
	if (body < 0)
		return -1;
	r->icmp.checksum = ~csum_fold(sum + (__u32)body);
	return send_reply(skb, &r->eth, sizeof(r->eth) + sizeof(r->ip6) + sizeof(r->icmp) + sizeof(r->quote), flags,
			  dev);
}

/*
 * Turns the packet into an ICMP "fragmentation needed" (next-hop MTU
 * `mtu`) to its sender and returns the redirect verdict that delivers it
 * (send_reply, through `dev`).  Returns -1 if the packet does not ask for
 * it (DF clear) or a helper failed; the caller drops it either way.
 *
 * The reply is built in the packet's own buffer, so that buffer must not
 * owe a checksum (csum_state.h): the kernel would complete it at its old
 * place, inside the reply.  The main program sends such a packet through
 * the detour, which completes it, and replies from there.
 */
static __always_inline int reply_frag_needed(struct __sk_buff *skb, const struct pkt *p, __u32 mtu, __u32 flags,
					     __u32 dev)
{
	__u32 zero = 0;
	struct frag_needed *r = bpf_map_lookup_elem(&sf_scratch, &zero);
	__u32 qlen = p->ihl_len + 8;

	_Static_assert(sizeof(*r) <= SCRATCH_SIZE, "the reply must fit the scratch map");
	if (p->family == SFUNNEL_FAMILY_IPV6)
		return reply_too_big6(skb, p, mtu, flags, dev);
	if (!r)
		return -1;
	/* Verifier workaround: clang may test one copy of qlen and pass
	 * another, whose bounds the verifier then does not know.  Masked,
	 * every copy is below 128 (and qlen keeps its value, at most 68):
	 * SCRATCH_SIZE leaves room for that after the quote's offset. */
	qlen &= 127;
	_Static_assert(offsetof(struct frag_needed, quote) + 128 <= SCRATCH_SIZE, "room for any masked qlen");
	if (qlen < sizeof(struct iphdr) + 8 || qlen > sizeof(r->quote))
		return -1;
	if (bpf_skb_load_bytes(skb, 0, &r->eth, sizeof(r->eth)) || bpf_skb_load_bytes(skb, p->l3, r->quote, qlen))
		return -1;
	if (!(bpf_ntohs(((struct iphdr *)r->quote)->frag_off) & IP_DF_FLAG))
		return -1;

	/* Every byte up to the quote is written: the scratch holds old data. */
	swap_macs(&r->eth);
	r->eth.h_proto = bpf_htons(ETH_P_IP);
	r->ip.version = 4;
	r->ip.ihl = sizeof(struct iphdr) / 4;
	r->ip.tos = 0xc0; /* internetwork control, as the kernel's own ICMP */
	r->ip.tot_len = bpf_htons(sizeof(r->ip) + sizeof(r->icmp) + qlen);
	r->ip.id = 0;
	r->ip.frag_off = 0;
	r->ip.ttl = 64;
	r->ip.protocol = IPPROTO_ICMP;
	r->ip.check = 0;
	/* From the address the packet was for: on the path the sender knows. */
	r->ip.saddr = p->daddr;
	r->ip.daddr = p->saddr;
	r->ip.check = ~csum_fold(bpf_csum_diff(0, 0, (__be32 *)&r->ip, sizeof(r->ip), 0));
	r->icmp.type = ICMP_DEST_UNREACH;
	r->icmp.code = ICMP_FRAG_NEEDED;
	r->icmp.checksum = 0;
	r->icmp.unused = 0;
	r->icmp.mtu = bpf_htons(mtu);
	/* qlen is a multiple of 4 (ihl_len is), as bpf_csum_diff wants. */
	r->icmp.checksum = ~csum_fold(bpf_csum_diff(0, 0, (__be32 *)&r->icmp, sizeof(r->icmp) + qlen, 0));

	return send_reply(skb, &r->eth, sizeof(r->eth) + sizeof(r->ip) + sizeof(r->icmp) + qlen, flags, dev);
}

#endif /* SFUNNEL_MTU_H */
