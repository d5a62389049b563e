// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * sfunnel's datapath: one TC program for TCX and clsact.
 *
 *   parse (parse.h) → look the packet up (lookup.h) → act (funnel.h)
 *
 * Verdicts: a miss returns TC_ACT_UNSPEC (-1), which is "next program" for
 * TCX (TCX_NEXT) and "continue" for a cls_bpf filter; a funnel, unfunnel
 * or accept returns TC_ACT_OK; drop returns TC_ACT_SHOT.  A funnel that
 * would exceed the MTU is dropped (with an ICMP reply redirected to the
 * sender: TC_ACT_REDIRECT) or passed unfunneled (mtu.h).
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

SEC("tc")
int sfunnel(struct __sk_buff *skb)
{
	struct pkt p = {};
	struct match m;
	int rc = parse_ipv4(skb, &p);

	if (rc != PARSE_OK) {
		count_stat(rc == PARSE_FRAGMENT    ? SFUNNEL_STAT_FRAGMENT :
			   rc == PARSE_NOT_IPV4 ? SFUNNEL_STAT_NOT_IPV4 :
						  SFUNNEL_STAT_MALFORMED);
		return TC_ACT_UNSPEC;
	}
	if (lookup_rule(skb, &p, &m)) {
		count_stat(SFUNNEL_STAT_MISS);
		return TC_ACT_UNSPEC;
	}

	/* Copy what we need: the rule's memory belongs to the map. */
	__u8 action = m.rule->action, proto = m.rule->proto;
	__be16 sport = m.rule->sport, dport = m.rule->dport;
	__u32 len = skb->len;

	switch (action) {
	case SFUNNEL_ACT_ACCEPT:
		count_rule(&m, len);
		return TC_ACT_OK;
	case SFUNNEL_ACT_DROP:
		count_rule(&m, len);
		return TC_ACT_SHOT;
	case SFUNNEL_ACT_FUNNEL: {
		__u32 hlen = proto == IPPROTO_TCP ? sizeof(struct tcphdr) : sizeof(struct udphdr);
		__u32 mtu = funnel_exceeds_mtu(skb, &p, hlen, m.flags);

		if (mtu) {
			count_over_mtu(&m);
			if (m.flags & SFUNNEL_PARAMS_OVER_MTU_PASS) {
				count_stat(SFUNNEL_STAT_OVER_MTU);
				return TC_ACT_UNSPEC;
			}
			/* Tell the sender the size that fits once funneled. */
			rc = mtu > hlen ? reply_frag_needed(skb, &p, mtu - hlen, m.flags) : -1;
			return rc == TC_ACT_REDIRECT ? TC_ACT_REDIRECT : TC_ACT_SHOT;
		}
		rc = funnel(skb, &p, proto, sport, dport);
		break;
	}
	case SFUNNEL_ACT_UNFUNNEL:
		if (proto == SFUNNEL_INNER_AUTO) {
			/* Never a guess: exactly one inner protocol must fit. */
			proto = sfunnel_auto_proto(skb, fits_at(&p), fits_lens(&p), fits_addrs(&p)) & 0xff;
			if (!proto) {
				count_stat(SFUNNEL_STAT_UNDECIDED);
				return TC_ACT_UNSPEC;
			}
		}
		rc = unfunnel(skb, &p, proto);
		break;
	default:
		return TC_ACT_UNSPEC;
	}

	switch (rc) {
	case FUNNEL_OK:
		count_rule(&m, len);
		return TC_ACT_OK;
	case FUNNEL_SKIP_MALFORMED:
		count_stat(SFUNNEL_STAT_MALFORMED);
		return TC_ACT_UNSPEC;
	case FUNNEL_SKIP_TOO_BIG:
		count_stat(SFUNNEL_STAT_TOO_BIG);
		return TC_ACT_UNSPEC;
	case FUNNEL_SKIP_ERROR:
		count_stat(SFUNNEL_STAT_ERROR);
		return TC_ACT_UNSPEC;
	default:
		/* Half-rewritten: never send it. */
		count_stat(SFUNNEL_STAT_ERROR);
		return TC_ACT_SHOT;
	}
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
