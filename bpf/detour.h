/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The segmentation detour: funneling GSO packets (docs/design.md, "The
 * segmentation detour").
 *
 * A GSO packet is cut into segments after tc egress, by the segmenter that
 * its outer IP protocol picks.  That segmenter would take a funnel header
 * for the packet's own L4 header and leave segments 2..N without the inner
 * one, so a GSO packet is never funneled whole.  Instead, an attachment
 * whose ruleset funnels owns a veth pair in its namespace (created by the
 * loader, recorded in `detour[0]`):
 *
 *   dev hook     a GSO packet that a funnel rule matches is redirected out
 *                of `out`, its gso_size first lowered if the funneled
 *                segments would not fit the MTU.  So is every TCP packet
 *                to funnel, GSO or not: a flow's packets then all take one
 *                path, in order (a short packet sent straight on would
 *                overtake the segments still in the detour, and TCP reads
 *                reordering as loss); and every packet whose checksum the
 *                kernel still owes (csum_state.h);
 *   out          has gso_max_segs 1, so the kernel segments it there, as
 *                it would for a device without TSO, and no transmit
 *                checksum offload, so it completes every checksum there
 *                too: the segments carry plain bytes from here on;
 *   in ingress   sfunnel_detour funnels each segment and sends it back:
 *                out of dev's egress, or for an ingress attachment
 *                (GRO-merged packets) into dev's receive path.  Where
 *                dev is a veth whose peer is in another namespace and
 *                whose transmit path would change nothing (no qdisc:
 *                SFUNNEL_DETOUR_PEER, set by the loader), a segment
 *                skips that path and goes straight
 *                into the peer's receive path, where veth would have
 *                delivered it: one trip through a CPU's backlog less per
 *                segment;
 *   dev hook     a segment back from the detour is already funneled, and
 *                passes on to the next program untouched.  On egress it is
 *                known by skb->ingress_ifindex (`in`); on ingress, which
 *                resets that, by a mark in skb->cb.
 */
#ifndef SFUNNEL_DETOUR_H
#define SFUNNEL_DETOUR_H

#include <linux/bpf.h>
#include <linux/if_packet.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include "maps.h"
#include "mtu.h"
#include "parse.h"

/* Largest gso_size cut: a funnel header and then some (TCP options). */
#define DETOUR_MAX_CUT 128

enum detour_result {
	DETOUR_NONE = 0,   /* no detour: the packet is unchanged */
	DETOUR_SENT = 1,   /* redirected (return TC_ACT_REDIRECT) */
	DETOUR_BROKEN = 2, /* changed and then a helper failed: drop it */
};

static __always_inline const struct sfunnel_detour *detour_get(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&sf_detour, &zero);
}

/* Whether the packet is a segment coming back from the detour, funneled. */
static __always_inline int detour_returned(struct __sk_buff *skb)
{
	const struct sfunnel_detour *d = detour_get();

	if (!d || !d->in_ifindex)
		return 0;
	if (skb->ingress_ifindex == d->in_ifindex)
		return 1;
	if (skb->cb[0] == SFUNNEL_DETOUR_MARK && skb->cb[1] == d->in_ifindex) {
		skb->cb[0] = 0;
		skb->cb[1] = 0;
		return 1;
	}
	return 0;
}

/*
 * The packet type the peer's eth_type_trans() would give a unicast frame
 * addressed to it: a segment is addressed to dev's next hop, which on a
 * routed veth is the peer (a bridge behind it goes by the address alone).
 */
static __always_inline __u32 peer_pkt_type(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end || !(eth->h_dest[0] & 1))
		return PACKET_HOST;
	for (int i = 0; i < ETH_ALEN; i++)
		if (eth->h_dest[i] != 0xff)
			return PACKET_MULTICAST;
	return PACKET_BROADCAST;
}

/* Sends a segment back from the detour to `d->dev_ifindex` (see above). */
static __always_inline int detour_return(struct __sk_buff *skb, const struct sfunnel_detour *d)
{
	if (d->flags & SFUNNEL_DETOUR_PEER) {
		/*
		 * What veth does to a packet it moves into another namespace
		 * (skb_scrub_packet, eth_type_trans) and bpf_redirect_peer does
		 * not before Linux 6.15: no mark or timestamp from this
		 * namespace, and the packet type the peer would give it (the
		 * helper end it came in on called it another host's).  Its
		 * conntrack entry and route went when it crossed the pair.
		 */
		skb->mark = 0;
		skb->tstamp = 0;
		bpf_skb_change_type(skb, peer_pkt_type(skb));
		return bpf_redirect_peer(d->dev_ifindex, 0);
	}
	if (d->flags & SFUNNEL_DETOUR_INGRESS) {
		skb->cb[0] = SFUNNEL_DETOUR_MARK;
		skb->cb[1] = d->in_ifindex;
		return bpf_redirect(d->dev_ifindex, BPF_F_INGRESS);
	}
	return bpf_redirect(d->dev_ifindex, 0);
}

/*
 * Sends a packet to funnel through the detour.  A GSO packet's segments
 * are l3 + l4 header + gso_size long; funneled they grow by hlen.  Where
 * that exceeds the MTU (the device's on egress, the route's on ingress),
 * gso_size comes down by the excess: adjust_room grown lowers it, and
 * shrunk again with FIXED_GSO leaves it so, the bytes as they were.
 */
static __always_inline int detour_send(struct __sk_buff *skb, const struct pkt *p, __u32 hlen, __u32 flags)
{
	const struct sfunnel_detour *d = detour_get();

	if (!d || !d->out_ifindex)
		return DETOUR_NONE;
	__u32 out = d->out_ifindex, mtu = 0;

	if (!skb->gso_size)
		goto send;
	__u32 seg = p->ihl_len + p->l4_hlen + skb->gso_size + hlen;

	if (flags & SFUNNEL_PARAMS_EGRESS) {
		/* On a GSO packet the check passes; it reports the MTU either way. */
		bpf_check_mtu(skb, 0, &mtu, 0, 0);
	} else {
		mtu = route_mtu_if_over(skb, p, seg, skb->ingress_ifindex);
	}
	if (mtu && seg > mtu && seg - mtu <= DETOUR_MAX_CUT) {
		__s32 cut = seg - mtu;

		/* UDP GSO refuses (its gso_size delimits datagrams): then the
		 * segments that would not fit are counted over_mtu in the detour. */
		if (bpf_skb_adjust_room(skb, cut, BPF_ADJ_ROOM_NET, 0) == 0 &&
		    bpf_skb_adjust_room(skb, -cut, BPF_ADJ_ROOM_NET, BPF_F_ADJ_ROOM_FIXED_GSO))
			return DETOUR_BROKEN;
	}
send:
	/* Only TCP is steered to other CPUs (the helper end's RPS, docs/design.md,
	 * "The segmentation detour"), where the sender waits for
	 * acknowledgements.  A datagram stays on the CPU that sends it, as
	 * plain UDP over a veth does: handed to another CPU, an unpaced sender
	 * would outrun it and fill its backlog queue.  RPS leaves a packet
	 * whose hash is 0 on the current CPU; the detour clears it again. */
	if (p->proto != IPPROTO_TCP)
		bpf_set_hash(skb, 0);
	bpf_redirect(out, 0);
	return DETOUR_SENT;
}

#endif /* SFUNNEL_DETOUR_H */
