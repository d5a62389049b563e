// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * sfunnel's datapath: one TC program for TCX and clsact.
 *
 *   parse (parse.h) → look the packet up (lookup.h) → act (sfunnel_act:
 *   funnel.h, mtu.h, detour.h)
 *
 * IPv4 and IPv6 take the same path.  Parse and lookup are inline, so a
 * miss makes no call; what a matched rule does is one global function,
 * which the verifier checks once for both families.
 *
 * Verdicts: a miss returns TC_ACT_UNSPEC (-1), which is "next program" for
 * TCX (TCX_NEXT) and "continue" for a cls_bpf filter; a funnel, unfunnel
 * or accept returns TC_ACT_OK; drop returns TC_ACT_SHOT.  A funnel that
 * would exceed the MTU is dropped (with an ICMP reply redirected to the
 * sender: TC_ACT_REDIRECT) or passed unfunneled (mtu.h).  A GSO packet to
 * funnel (and any TCP one) goes through the segmentation detour (detour.h):
 * TC_ACT_REDIRECT, and sfunnel_detour funnels its segments.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "sfunnel.h"
#include "maps.h"
#include "parse.h"
#include "lookup.h"
#include "funnel.h"
#include "mtu.h"
#include "detect.h"
#include "detour.h"
#include "csum_state.h"

/* Counts why funnel() or unfunnel() left a packet alone (or broke it). */
static __always_inline void count_funnel_skip(int rc)
{
	count_stat(rc == FUNNEL_SKIP_MALFORMED ? SFUNNEL_STAT_MALFORMED :
		   rc == FUNNEL_SKIP_TOO_BIG   ? SFUNNEL_STAT_TOO_BIG :
						 SFUNNEL_STAT_ERROR);
}

/*
 * What the rule `m` that matched the parsed packet `p` does: the verdict.
 *
 * Verifier workaround: a global function.  The verifier checks it once, on
 * its own, with every field of *p and *m unknown, so it is verified once
 * for both families; inlined, the constants an IPv4 and an IPv6 parse
 * leave (the family, the header length) made every path after the lookup
 * verified twice, and the program took twice as long to load.  Packets
 * no rule matches never get here, so misses pay nothing for the call.
 */
__noinline int sfunnel_act(struct __sk_buff *skb, struct pkt *p, struct rule_match *m)
{
	int rc;

	if (!skb || !p || !m)
		return TC_ACT_UNSPEC;
	__u8 action = m->rule.action, proto = m->rule.proto;
	__be16 sport = m->rule.sport, dport = m->rule.dport;
	__u32 len = skb->len;

	switch (action) {
	case SFUNNEL_ACT_ACCEPT:
		count_rule(m, len);
		return TC_ACT_OK;
	case SFUNNEL_ACT_DROP:
		count_rule(m, len);
		return TC_ACT_SHOT;
	case SFUNNEL_ACT_FUNNEL: {
		__u32 hlen = l4_hdr_len(proto);
		__u32 mtu = funnel_exceeds_mtu(skb, p, hlen, m->flags);

		if (mtu) {
			if (m->flags & SFUNNEL_PARAMS_OVER_MTU_PASS) {
				count_over_mtu(m);
				count_stat(SFUNNEL_STAT_OVER_MTU);
				return TC_ACT_UNSPEC;
			}
			/* The reply is made in this buffer: one that owes a checksum
			 * has it completed in the detour first (mtu.h), and the
			 * detour replies (and counts it). */
			if (csum_owed(skb)) {
				rc = detour_send(skb, p, hlen, m->flags);
				if (rc == DETOUR_SENT)
					return TC_ACT_REDIRECT;
				if (rc == DETOUR_BROKEN) {
					count_stat(SFUNNEL_STAT_ERROR);
					return TC_ACT_SHOT;
				}
			}
			count_over_mtu(m);
			/* Tell the sender the size that fits once funneled. */
			rc = mtu > hlen ? reply_frag_needed(skb, p, mtu - hlen, m->flags, 0) : -1;
			return rc == TC_ACT_REDIRECT ? TC_ACT_REDIRECT : TC_ACT_SHOT;
		}
		/* GSO packets, all of TCP so that a flow keeps its order, and
		 * packets whose checksum the kernel still owes (csum_state.h). */
		if (skb->gso_size || p->proto == IPPROTO_TCP || csum_owed(skb)) {
			rc = detour_send(skb, p, hlen, m->flags);
			if (rc == DETOUR_SENT)
				return TC_ACT_REDIRECT;
			if (rc == DETOUR_BROKEN) {
				count_stat(SFUNNEL_STAT_ERROR);
				return TC_ACT_SHOT;
			}
			/* No detour: funneled here, GSO or not (as 0.0.11 did). */
		}
		rc = funnel(skb, p, proto, sport, dport);
		break;
	}
	case SFUNNEL_ACT_UNFUNNEL:
		if (proto == SFUNNEL_INNER_AUTO) {
			/* Never a guess: exactly one inner protocol must fit. */
			proto = sfunnel_auto_proto(skb, fits_at(p), fits_lens(p), fits_addrs(p)) & 0xff;
			if (!proto) {
				count_stat(SFUNNEL_STAT_UNDECIDED);
				return TC_ACT_UNSPEC;
			}
		}
		rc = unfunnel(skb, p, proto);
		break;
	default:
		return TC_ACT_UNSPEC;
	}

	if (rc == FUNNEL_OK) {
		count_rule(m, len);
		return TC_ACT_OK;
	}
	count_funnel_skip(rc);
	/* Half-rewritten: never send it. */
	return rc == FUNNEL_BROKEN ? TC_ACT_SHOT : TC_ACT_UNSPEC;
}

SEC("tc")
int sfunnel(struct __sk_buff *skb)
{
	struct pkt p = {};
	struct rule_match m = {};

	if (detour_returned(skb))
		return TC_ACT_UNSPEC;

	int rc = parse_ip(skb, &p);

	if (rc != PARSE_OK) {
		count_stat(rc == PARSE_FRAGMENT    ? SFUNNEL_STAT_FRAGMENT :
			   rc == PARSE_NOT_IPV4 ? SFUNNEL_STAT_NOT_IP_TCP_UDP :
			   rc == PARSE_IPV6_EXT ? SFUNNEL_STAT_IPV6_EXT :
						  SFUNNEL_STAT_MALFORMED);
		return TC_ACT_UNSPEC;
	}
	if (lookup_rule(skb, &p, &m)) {
		count_stat(SFUNNEL_STAT_MISS);
		return TC_ACT_UNSPEC;
	}
	return sfunnel_act(skb, &p, &m);
}

/*
 * Funnels one segment in the detour (below) by the rule `m`: 0 to send it
 * on, funneled or left as it was; -1 to drop it; TC_ACT_REDIRECT when it
 * became a reply to its sender.  A global function, for the reason
 * sfunnel_act is one.
 */
__noinline int sfunnel_detour_funnel(struct __sk_buff *skb, struct pkt *p, struct rule_match *m, __u32 dev,
				     __u32 egress)
{
	if (!skb || !p || !m)
		return -1;
	__u8 proto = m->rule.proto;
	__be16 sport = m->rule.sport, dport = m->rule.dport;
	__u32 len = skb->len;
	__u32 hlen = l4_hdr_len(proto);

	/* Left whole by the helper, it cannot be funneled. */
	if (skb->gso_size) {
		count_stat(SFUNNEL_STAT_ERROR);
		return -1;
	}
	/* Segments were cut to fit.  One that does not (a UDP GSO datagram,
	 * the MTU changed on the way, or a packet the main program sent here
	 * for the guard to reply from a buffer with its checksum complete) is
	 * handled as the guard handles it there (mtu.h). */
	__u32 mtu = exceeds_mtu(skb, p, hlen, egress, dev);

	if (mtu) {
		count_over_mtu(m);
		if (m->flags & SFUNNEL_PARAMS_OVER_MTU_PASS) {
			count_stat(SFUNNEL_STAT_OVER_MTU);
			return 0;
		}
		int rc = mtu > hlen ? reply_frag_needed(skb, p, mtu - hlen, m->flags, dev) : -1;

		return rc == TC_ACT_REDIRECT ? TC_ACT_REDIRECT : -1;
	}
	int rc = funnel(skb, p, proto, sport, dport);

	if (rc == FUNNEL_OK) {
		count_rule(m, len);
		return 0;
	}
	count_funnel_skip(rc);
	/* Left unchanged, it is sent on as the main program passes it. */
	return rc == FUNNEL_BROKEN ? -1 : 0;
}

/*
 * The detour's far end (detour.h): the ingress of the helper veth end that
 * segments come in on.  Each is funneled by the rule that sent its GSO
 * packet here and goes back to the attachment's interface.
 */
SEC("tc")
int sfunnel_detour(struct __sk_buff *skb)
{
	const struct sfunnel_detour *d = detour_get();
	struct pkt p = {};
	struct rule_match m = {};

	if (!d || !d->dev_ifindex)
		return TC_ACT_SHOT;
	/* A datagram that detour_send kept on its CPU (hash 0): whoever needs
	 * a hash from here on computes it, from the headers it then has. */
	if (!skb->hash)
		bpf_set_hash_invalid(skb);

	/* Only IP packets to funnel are sent here (segments of GSO ones, TCP,
	 * and packets whose checksum was owed); anything else is the helper's
	 * own traffic, and never leaves. */
	if (parse_ip(skb, &p) != PARSE_OK)
		return TC_ACT_SHOT;
	/* The ruleset may have changed since: a packet that no funnel rule
	 * matches now goes on unchanged. */
	if (lookup_rule(skb, &p, &m) || m.rule.action != SFUNNEL_ACT_FUNNEL)
		return detour_return(skb, d);
	int rc = sfunnel_detour_funnel(skb, &p, &m, d->dev_ifindex, !(d->flags & SFUNNEL_DETOUR_INGRESS));

	if (rc == TC_ACT_REDIRECT)
		return TC_ACT_REDIRECT;
	if (rc)
		return TC_ACT_SHOT;
	return detour_return(skb, d);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
