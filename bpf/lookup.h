/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Rule lookup: classify each field, then probe only the shapes that can
 * still match.  The cost is bounded by the number of shapes (16 per family
 * and protocol), never by the number of rules.  See sfunnel.h for the
 * layout.
 */
#ifndef SFUNNEL_LOOKUP_H
#define SFUNNEL_LOOKUP_H

#include "maps.h"
#include "parse.h"
#include "detect.h"

struct rule_match {
	struct sfunnel_rule_val rule; /* a copy: the map's memory may change */
	__u32 gen;
	__u32 counter_stride;
	__u32 flags; /* sfunnel_params.flags */
};

/*
 * The class of the packet's source (`daddr` 0) or destination address, and
 * the shapes it allows.
 */
static __always_inline int addr_class(struct __sk_buff *skb, const struct sfunnel_params *prm, void *trie,
				      const struct pkt *p, int daddr, __u32 *class, __u64 *shapes)
{
	struct sfunnel_addr_key k = {};
	__u32 field = p->family * 2 + (daddr & 1);

	if (p->family == SFUNNEL_FAMILY_IPV4) {
		__be32 addr = daddr ? p->daddr : p->saddr;

		k.prefixlen = 32 + 32; /* field + pad + the address */
		__builtin_memcpy(k.addr, &addr, sizeof(addr));
	} else {
		/* parse_ip made the header linear, and nothing has changed it. */
		void *data = (void *)(long)skb->data;
		void *data_end = (void *)(long)skb->data_end;
		__u8 *a = data + ETH_HLEN + (daddr ? IPV6_DADDR_OFF : IPV6_SADDR_OFF);

		if ((void *)(a + sizeof(k.addr)) > data_end)
			return -1;
		k.prefixlen = 32 + 128;
		__builtin_memcpy(k.addr, a, sizeof(k.addr));
	}
	k.field = field;
	field &= 3;

	/* The first octet is the first byte in network order. */
	__u8 octet = k.addr[0];
	if (!((prm->octets[field][octet >> 6] >> (octet & 63)) & 1)) {
		/*
		 * Verifier workaround: class 0 read from the map, not written as
		 * a constant, so both paths reach the shape loop with the same
		 * kind of state and the verifier prunes one of them (a constant
		 * here doubles the time the program takes to load).
		 */
		*class = prm->root_class;
		*shapes = prm->root_shapes[field];
		return 0;
	}
	struct sfunnel_addr_class *c = bpf_map_lookup_elem(trie, &k);

	/* The trie always holds the root (0.0.0.0/0, ::/0) for a field in use. */
	if (!c)
		return -1;
	*class = c->class;
	*shapes = c->shapes;
	return 0;
}

/* Returns 0 and the first matching rule, or -1 on a miss. */
static __always_inline int lookup_rule(struct __sk_buff *skb, const struct pkt *p, struct rule_match *out)
{
	__u32 zero = 0;
	__u32 *active_gen = bpf_map_lookup_elem(&sf_active, &zero);
	if (!active_gen)
		return -1;
	__u32 gen = *active_gen & 1;

	struct sfunnel_params *prm = bpf_map_lookup_elem(&sf_params, &gen);
	if (!prm)
		return -1;
	__u32 slot = (p->family * 2 + (p->proto == IPPROTO_UDP)) & (SLOTS - 1);
	__u32 shift = slot * SHAPES_PER_PROTO;
	__u64 shapes = prm->shapes >> shift;

	__u32 idx = gen * PORT_SPACE + p->sport;
	struct sfunnel_port_class *sp = bpf_map_lookup_elem(&sf_ports, &idx);
	idx = gen * PORT_SPACE + p->dport;
	struct sfunnel_port_class *dp = bpf_map_lookup_elem(&sf_ports, &idx);
	if (!sp || !dp)
		return -1;
	shapes &= (sp->sport_shapes >> shift) & (dp->dport_shapes >> shift) & 0xffff;
	if (!shapes)
		return -1;

	__u32 sa = 0, da = 0;
	__u64 s;
	if (shapes & (SHAPESET_WITH_SADDR | SHAPESET_WITH_DADDR) & 0xffff) {
		void *trie = bpf_map_lookup_elem(&sf_addr_maps, &gen);
		if (!trie)
			return -1;
		if (shapes & SHAPESET_WITH_SADDR & 0xffff) {
			if (addr_class(skb, prm, trie, p, 0, &sa, &s))
				return -1;
			shapes &= s >> shift;
		}
		if (shapes & SHAPESET_WITH_DADDR & 0xffff) {
			if (addr_class(skb, prm, trie, p, 1, &da, &s))
				return -1;
			shapes &= s >> shift;
		}
		shapes &= 0xffff;
		if (!shapes)
			return -1;
	}

	void *rules = bpf_map_lookup_elem(&sf_rule_maps, &gen);
	if (!rules)
		return -1;

	struct sfunnel_rule_key key = {};
	const struct sfunnel_rule_val *best = NULL;
	key.proto = p->proto;
	key.family = p->family;
	/* Only packets of a family and protocol whose rules use `funneled`
	 * pay for the test (detect.h). */
	if (prm->flags & (1 << slot))
		key.funneled = looks_funneled(skb, p);
	for (__u32 shape = 0; shape < SHAPES_PER_PROTO; shape++) {
		if (!(shapes >> shape))
			break;
		if (!((shapes >> shape) & 1))
			continue;
		key.saddr_class = shape & SHAPE_SADDR ? sa : 0;
		key.daddr_class = shape & SHAPE_DADDR ? da : 0;
		key.sport_class = shape & SHAPE_SPORT ? sp->sport_class : 0;
		key.dport_class = shape & SHAPE_DPORT ? dp->dport_class : 0;
		key.shape = shape;
		const struct sfunnel_rule_val *v = bpf_map_lookup_elem(rules, &key);
		if (v && (!best || v->index < best->index))
			best = v;
	}
	if (!best)
		return -1;
	out->rule = *best;
	out->gen = gen;
	out->counter_stride = prm->counter_stride;
	out->flags = prm->flags;
	return 0;
}

/* The rule's counters on this CPU; NULL if they are gone. */
static __always_inline struct sfunnel_counter *rule_counter(const struct rule_match *m)
{
	/* A key on the stack: 6.1 takes no other memory for one. */
	__u32 gen = m->gen;
	void *counters = bpf_map_lookup_elem(&sf_counter_maps, &gen);
	if (!counters)
		return NULL;
	/* Only this CPU writes its block, with bottom halves off: no atomics. */
	__u32 idx = bpf_get_smp_processor_id() * m->counter_stride + m->rule.index;
	return bpf_map_lookup_elem(counters, &idx);
}

static __always_inline void count_rule(const struct rule_match *m, __u32 bytes)
{
	struct sfunnel_counter *c = rule_counter(m);
	if (c) {
		c->packets++;
		c->bytes += bytes;
	}
}

static __always_inline void count_over_mtu(const struct rule_match *m)
{
	struct sfunnel_counter *c = rule_counter(m);
	if (c)
		c->over_mtu++;
}

static __always_inline void count_stat(__u32 reason)
{
	__u64 *v = bpf_map_lookup_elem(&sf_stats, &reason);
	if (v)
		(*v)++;
}

#endif /* SFUNNEL_LOOKUP_H */
