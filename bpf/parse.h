/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Packet parsing: Ethernet → IPv4 → TCP/UDP, every length checked. */
#ifndef SFUNNEL_PARSE_H
#define SFUNNEL_PARSE_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "sfunnel.h"

#define IP_MF_OFFSET 0x3fff /* IP_MF | IP_OFFSET, host order */
#define IPV4_MAX_HLEN 60
/* Enough linear data for Ethernet, the largest IPv4 header and TCP header. */
#define PULL_LEN (ETH_HLEN + IPV4_MAX_HLEN + sizeof(struct tcphdr))

/* What the datapath knows about a packet after parsing.  Offsets are from
 * the start of the frame; ports are in host order. */
struct pkt {
	__u32 l3;      /* IPv4 header */
	__u32 ihl_len; /* IPv4 header length, options included */
	__u32 l4;      /* L4 header */
	__u32 l4_len;  /* L4 header + payload, from tot_len */
	__u32 tot_len;
	__be32 saddr;
	__be32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 l4_hlen; /* TCP: doff * 4; UDP: 8 */
	__be16 l4_csum;
};

enum parse_result {
	PARSE_OK = 0,
	PARSE_NOT_IPV4 = -1,
	PARSE_FRAGMENT = -2,
	PARSE_MALFORMED = -3,
};

/*
 * Parses an IPv4 TCP or UDP packet.  Headers must be complete and agree
 * with each other and with the skb length; anything else is not ours to
 * touch.
 */
static __always_inline int parse_ipv4(struct __sk_buff *skb, struct pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;

	/* Headers may sit in paged data; make them linear (no byte changes). */
	if (data + PULL_LEN > data_end && skb->len > (__u32)(data_end - data)) {
		if (bpf_skb_pull_data(skb, skb->len < PULL_LEN ? skb->len : PULL_LEN))
			return PARSE_MALFORMED;
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
	}

	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return PARSE_NOT_IPV4;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return PARSE_NOT_IPV4;

	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return PARSE_MALFORMED;
	if (ip->version != 4 || ip->ihl < 5)
		return PARSE_MALFORMED;
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return PARSE_NOT_IPV4;
	if (bpf_ntohs(ip->frag_off) & IP_MF_OFFSET)
		return PARSE_FRAGMENT;

	__u32 ihl_len = ip->ihl * 4;
	__u32 tot_len = bpf_ntohs(ip->tot_len);
	if (tot_len < ihl_len || ETH_HLEN + tot_len > skb->len)
		return PARSE_MALFORMED;

	p->l3 = ETH_HLEN;
	p->ihl_len = ihl_len;
	p->l4 = ETH_HLEN + ihl_len;
	p->l4_len = tot_len - ihl_len;
	p->tot_len = tot_len;
	p->saddr = ip->saddr;
	p->daddr = ip->daddr;
	p->proto = ip->protocol;

	/* ihl_len <= 60: the verifier sees a bounded variable offset. */
	void *l4 = (void *)ip + ihl_len;
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
		if (bpf_ntohs(uh->len) != p->l4_len)
			return PARSE_MALFORMED;
		p->l4_hlen = sizeof(*uh);
		p->sport = bpf_ntohs(uh->source);
		p->dport = bpf_ntohs(uh->dest);
		p->l4_csum = uh->check;
	}
	return PARSE_OK;
}

#endif /* SFUNNEL_PARSE_H */
