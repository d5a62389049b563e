/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Packet parsing: Ethernet → IPv4 or IPv6 → TCP/UDP, every length checked. */
#ifndef SFUNNEL_PARSE_H
#define SFUNNEL_PARSE_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "sfunnel.h"

#define IP_MF_OFFSET 0x3fff /* IP_MF | IP_OFFSET, host order */
#define IPV4_MAX_HLEN 60
#define IPV6_HLEN 40
/* Enough linear data for Ethernet, the largest IPv4 header and TCP header
 * (more than the IPv6 header and TCP header need). */
#define PULL_LEN (ETH_HLEN + IPV4_MAX_HLEN + sizeof(struct tcphdr))
/* What headers_len() needs to see to say more than PULL_LEN. */
#define PEEK_LEN (ETH_HLEN + IPV6_HLEN)
/* Offsets of the addresses in the IPv6 header. */
#define IPV6_SADDR_OFF 8
#define IPV6_DADDR_OFF 24

/* What the datapath knows about a packet after parsing.  Offsets are from
 * the start of the frame; ports are in host order. */
struct pkt {
	__u32 l3;       /* IP header */
	__u32 ihl_len;  /* IP header length: IPv4 with options, IPv6 40 */
	__u32 opts_len; /* IPv4 options (0 for IPv6) */
	__u32 l4;       /* L4 header */
	__u32 l4_len;   /* L4 header + payload, from tot_len or payload_len */
	__u32 tot_len;  /* IP header + l4_len */
	__u32 addr_sum; /* sum of both addresses' 16-bit words (pseudo-headers) */
	__be32 saddr;   /* IPv4 only; IPv6 addresses are read from the packet */
	__be32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 family; /* enum sfunnel_family */
	__u8 proto;
	__u8 l4_hlen; /* TCP: doff * 4; UDP: 8 */
	__u8 pad;
	__be16 l4_csum;
};

enum parse_result {
	PARSE_OK = 0,
	PARSE_NOT_IPV4 = -1, /* not IPv4 or IPv6 TCP/UDP */
	PARSE_FRAGMENT = -2,
	PARSE_MALFORMED = -3,
	PARSE_IPV6_EXT = -4, /* IPv6 with an extension header other than a fragment header */
};

/* Sum of an IPv6 address's 16-bit words, in memory order. */
static __always_inline __u32 csum_addr6(const struct in6_addr *a)
{
	__u32 s = 0;
#pragma unroll
	for (int i = 0; i < 4; i++)
		s += (a->in6_u.u6_addr32[i] & 0xffff) + (a->in6_u.u6_addr32[i] >> 16);
	return s;
}

/* The IPv6 extension headers of RFC 8200 §4 and RFC 7045, fragment aside. */
static __always_inline int ipv6_ext_header(__u8 nh)
{
	return nh == IPPROTO_HOPOPTS || nh == IPPROTO_ROUTING || nh == IPPROTO_DSTOPTS || nh == IPPROTO_ESP ||
	       nh == IPPROTO_AH || nh == IPPROTO_MH || nh == 139 /* HIP */ || nh == 140 /* Shim6 */ ||
	       nh == 253 || nh == 254 /* experimental */;
}

/*
 * How much of the frame parse_ip reads: Ethernet, the IP header (IPv4
 * options included) and the fixed part of the L4 header.  PULL_LEN when the
 * IP header is not linear yet; 0 for what is not IP.
 *
 * A GSO segment (cut by the detour, or by a router's software GSO) holds
 * just its headers in linear data, and TCP options make them shorter than
 * PULL_LEN; pulling PULL_LEN regardless copied payload out of the pages on
 * every segment, and often reallocated the head to fit it.
 */
static __always_inline __u32 headers_len(void *data, void *data_end)
{
	struct ethhdr *eth = data;

	if (data + PEEK_LEN > data_end)
		return PULL_LEN;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		return ETH_HLEN + ip->ihl * 4 +
		       (ip->protocol == IPPROTO_UDP ? sizeof(struct udphdr) : sizeof(struct tcphdr));
	}
	if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		return ETH_HLEN + IPV6_HLEN +
		       (ip6->nexthdr == IPPROTO_UDP ? sizeof(struct udphdr) : sizeof(struct tcphdr));
	}
	return 0;
}

/*
 * Parses an IPv4 or IPv6 TCP or UDP packet.  Headers must be complete and
 * agree with each other and with the skb length; anything else is not ours
 * to touch.  IPv6 packets whose L4 header does not follow the fixed header
 * directly (extension headers) are passed over: PARSE_IPV6_EXT, or
 * PARSE_FRAGMENT for a fragment header.
 */
static __always_inline int parse_ip(struct __sk_buff *skb, struct pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;

	/* Headers may sit in paged data; make them linear (no byte changes). */
	__u32 linear = data_end - data, need;

	if (skb->len > linear && (need = headers_len(data, data_end)) > linear) {
		if (bpf_skb_pull_data(skb, skb->len < need ? skb->len : need))
			return PARSE_MALFORMED;
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
	}

	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return PARSE_NOT_IPV4;

	__u32 ihl_len;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > data_end)
			return PARSE_MALFORMED;
		if (ip->version != 4 || ip->ihl < 5)
			return PARSE_MALFORMED;
		if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
			return PARSE_NOT_IPV4;
		if (bpf_ntohs(ip->frag_off) & IP_MF_OFFSET)
			return PARSE_FRAGMENT;

		ihl_len = ip->ihl * 4;
		__u32 tot_len = bpf_ntohs(ip->tot_len);
		if (tot_len < ihl_len || ETH_HLEN + tot_len > skb->len)
			return PARSE_MALFORMED;
		p->family = SFUNNEL_FAMILY_IPV4;
		p->opts_len = ihl_len - sizeof(struct iphdr);
		p->l4_len = tot_len - ihl_len;
		p->tot_len = tot_len;
		p->saddr = ip->saddr;
		p->daddr = ip->daddr;
		p->addr_sum = (ip->saddr & 0xffff) + (ip->saddr >> 16) + (ip->daddr & 0xffff) + (ip->daddr >> 16);
		p->proto = ip->protocol;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > data_end)
			return PARSE_MALFORMED;
		if (ip6->version != 6)
			return PARSE_MALFORMED;
		if (ip6->nexthdr == IPPROTO_FRAGMENT)
			return PARSE_FRAGMENT;
		if (ipv6_ext_header(ip6->nexthdr))
			return PARSE_IPV6_EXT;
		if (ip6->nexthdr != IPPROTO_TCP && ip6->nexthdr != IPPROTO_UDP)
			return PARSE_NOT_IPV4;

		ihl_len = IPV6_HLEN;
		__u32 payload_len = bpf_ntohs(ip6->payload_len);
		/* 0 is a jumbogram's (RFC 2675), whose length is elsewhere. */
		if (payload_len == 0 || ETH_HLEN + IPV6_HLEN + payload_len > skb->len)
			return PARSE_MALFORMED;
		p->family = SFUNNEL_FAMILY_IPV6;
		p->opts_len = 0;
		p->l4_len = payload_len;
		p->tot_len = IPV6_HLEN + payload_len;
		p->saddr = 0;
		p->daddr = 0;
		p->addr_sum = csum_addr6(&ip6->saddr) + csum_addr6(&ip6->daddr);
		p->proto = ip6->nexthdr;
	} else {
		return PARSE_NOT_IPV4;
	}
	p->l3 = ETH_HLEN;
	p->ihl_len = ihl_len;
	p->l4 = ETH_HLEN + ihl_len;

	/* ihl_len <= 60: the verifier sees a bounded variable offset. */
	if (ihl_len > IPV4_MAX_HLEN)
		return PARSE_MALFORMED;
	void *l4 = data + ETH_HLEN + ihl_len;
	if (p->proto == IPPROTO_TCP) {
		struct tcphdr *th = l4;
		if ((void *)(th + 1) > data_end)
			return PARSE_MALFORMED;
		__u32 doff = th->doff * 4;
		if (doff < sizeof(*th) || doff > p->l4_len)
			return PARSE_MALFORMED;
		p->l4_hlen = doff;
		p->sport = bpf_ntohs(th->source);
		p->dport = bpf_ntohs(th->dest);
		p->l4_csum = th->check;
	} else {
		struct udphdr *uh = l4;
		if ((void *)(uh + 1) > data_end)
			return PARSE_MALFORMED;
		/* The length field is the L4 length, header included. */
		if (bpf_ntohs(uh->len) != p->l4_len || p->l4_len < sizeof(*uh))
			return PARSE_MALFORMED;
		p->l4_hlen = sizeof(*uh);
		p->sport = bpf_ntohs(uh->source);
		p->dport = bpf_ntohs(uh->dest);
		p->l4_csum = uh->check;
	}
	return PARSE_OK;
}

#endif /* SFUNNEL_PARSE_H */
