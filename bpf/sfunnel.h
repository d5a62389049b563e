/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Every struct and constant that crosses between the datapath and user space.
 * Rust sees these through the libbpf-cargo skeleton (`types::`); there is no
 * hand-written mirror.  Byte order is in the field types; padding is explicit.
 *
 * How a ruleset is laid out (see src/ruleset/compile.rs for the compiler):
 *
 *  - A rule is of one family, IPv4 (`ip`, the default) or IPv6 (`ip6`), and
 *    one protocol; the pair is its *slot* (SLOT_*).
 *  - Each field a rule can constrain (saddr, daddr, sport, dport) is first
 *    mapped to a small *class* id: ports through a 65536-entry array, addresses
 *    through an LPM trie holding every prefix the ruleset names (classes of
 *    IPv4 and IPv6 addresses are numbered apart).
 *  - A rule's *shape* is the set of fields it constrains (SHAPE_* bits).  For
 *    each shape there is one exact-match key space in the rules hash map,
 *    keyed by the classes of the fields of that shape, the family and the
 *    protocol.
 *  - Every class also carries the set of shapes that can still match a packet
 *    in that class, so a packet only probes the shapes that can hit, and a
 *    miss usually ends after the array lookups.
 *  - When some TCP (UDP) rule uses the `funneled` match, the params say so
 *    (SFUNNEL_PARAMS_FUNNELED_*): the datapath then computes one bit for TCP
 *    (UDP) packets, "this packet looks funneled" (detect.h), and puts it in
 *    the rule key.  Rules of that protocol without `funneled` have entries
 *    under both values of the bit, rules with it only under 1, so first
 *    match still holds.  Other packets and rulesets never compute the bit.
 *  - A packet therefore costs at most 2 array + 2 LPM + 16 hash lookups,
 *    whatever the number of rules.  First match wins: each entry holds the
 *    index of the first rule that produced it, and the smallest index over the
 *    probed shapes is the answer.
 *
 * Two generations of everything exist; `sf_active` names the one in use.  A
 * rerun fills the other one and flips `sf_active` with a single 4-byte write.
 */
#ifndef SFUNNEL_H
#define SFUNNEL_H

#include <linux/types.h>

/* The maps' layout and the datapath's behaviour, as one number: a rerun
 * updates a program of the same number in place, and replaces any other. */
#define SFUNNEL_ABI_VERSION 8

/* Shape bits: which fields besides the protocol a rule constrains. */
#define SHAPE_SADDR 0x1
#define SHAPE_DADDR 0x2
#define SHAPE_SPORT 0x4
#define SHAPE_DPORT 0x8
#define SHAPES_PER_PROTO 16

/*
 * A shape set is a __u64: bit (slot * 16 + shape), one slot per family and
 * protocol (SLOT_*).  These masks pick the shapes that need an address
 * lookup.
 */
#define SHAPESET_WITH_SADDR 0xAAAAAAAAAAAAAAAAull
#define SHAPESET_WITH_DADDR 0xCCCCCCCCCCCCCCCCull

/* Shape-set slots: IPv4 TCP, IPv4 UDP, IPv6 TCP, IPv6 UDP. */
#define SLOT_TCP4 0
#define SLOT_UDP4 1
#define SLOT_TCP6 2
#define SLOT_UDP6 3
#define SLOTS 4

/* sfunnel_rule_key.family and the family half of an address field. */
enum sfunnel_family {
	SFUNNEL_FAMILY_IPV4 = 0,
	SFUNNEL_FAMILY_IPV6 = 1,
};

#define PORT_SPACE 65536
#define GENERATIONS 2
/* The loaded ruleset's canonical text is kept in chunks of this size. */
#define RULESET_TEXT_CHUNK 4096

enum sfunnel_action {
	SFUNNEL_ACT_FUNNEL = 1,
	SFUNNEL_ACT_UNFUNNEL = 2,
	SFUNNEL_ACT_ACCEPT = 3,
	SFUNNEL_ACT_DROP = 4,
};

/* sfunnel_rule_val.proto of `unfunnel auto`: detect the inner protocol. */
#define SFUNNEL_INNER_AUTO 0

/*
 * sfunnel_params.flags.  From the ruleset: some rule of that family and
 * protocol uses `funneled` (bit = 1 << slot).  From the loader, per
 * attachment: the direction, and what becomes of a packet too big to
 * funnel (mtu.h).
 */
#define SFUNNEL_PARAMS_FUNNELED_TCP 0x1  /* IPv4 */
#define SFUNNEL_PARAMS_FUNNELED_UDP 0x2  /* IPv4 */
#define SFUNNEL_PARAMS_FUNNELED_TCP6 0x4
#define SFUNNEL_PARAMS_FUNNELED_UDP6 0x8
#define SFUNNEL_PARAMS_EGRESS 0x10        /* attached to egress (else ingress) */
#define SFUNNEL_PARAMS_OVER_MTU_PASS 0x20 /* over the MTU: pass unfunneled (else drop) */

/* sfunnel_addr_key.field: family * 2 + the header field. */
enum sfunnel_addr_field {
	SFUNNEL_FIELD_SADDR = 0,
	SFUNNEL_FIELD_DADDR = 1,
	SFUNNEL_FIELD_SADDR6 = 2,
	SFUNNEL_FIELD_DADDR6 = 3,
};

/* `sf_params[gen]`: what a generation's ruleset needs to be walked. */
struct sfunnel_params {
	__u64 shapes;         /* shape set of every rule in the ruleset */
	__u32 nrules;
	__u32 counter_stride; /* counters per CPU: nrules padded to a cache line */
	__u32 root_class;     /* 0: the class of 0.0.0.0/0 (see lookup.h) */
	__u32 flags;          /* SFUNNEL_PARAMS_* */
	/*
	 * Per address field (enum sfunnel_addr_field): the first octets that
	 * some named prefix covers, as a 256-bit set.  An address whose first
	 * octet is not in it can only be in class 0 (0.0.0.0/0 or ::/0), whose
	 * shape set is `root_shapes`: the LPM lookup is skipped.
	 */
	__u64 octets[4][4];
	__u64 root_shapes[4];
};

/* `sf_ports[gen * PORT_SPACE + port]`, port in host order. */
struct sfunnel_port_class {
	__u16 sport_class;
	__u16 dport_class;
	__u32 pad;          /* zero */
	__u64 sport_shapes; /* shapes that can match with this source port */
	__u64 dport_shapes; /* shapes that can match with this destination port */
};

/*
 * Key of the address LPM trie, one trie for both families.  The trie
 * compares `field`, `pad` and `addr` as one bit string, so prefixlen = 32 +
 * the address prefix length.  An IPv4 address takes addr[0..4]; the field
 * keeps the families apart.
 */
struct sfunnel_addr_key {
	__u32 prefixlen;
	__u8 field;  /* enum sfunnel_addr_field */
	__u8 pad[3]; /* zero */
	__u8 addr[16];
};

struct sfunnel_addr_class {
	__u32 class;
	__u32 pad;    /* zero */
	__u64 shapes; /* shapes that can match with an address in this class */
};

/* Key of the rules hash map.  Fields outside `shape` are zero. */
struct sfunnel_rule_key {
	__u32 saddr_class;
	__u32 daddr_class;
	__u16 sport_class;
	__u16 dport_class;
	__u8 proto; /* IPPROTO_TCP or IPPROTO_UDP: the packet's L4 protocol */
	__u8 shape;
	__u8 funneled; /* 1: the packet looks funneled; 0 unless SFUNNEL_PARAMS_FUNNELED_* */
	__u8 family;   /* enum sfunnel_family: classes are per family */
};

struct sfunnel_rule_val {
	__u32 index;  /* the rule's position in the ruleset: smaller wins */
	__u8 action;  /* enum sfunnel_action */
	__u8 proto;   /* funnel: header to insert; unfunnel: inner protocol or SFUNNEL_INNER_AUTO */
	__be16 sport; /* funnel header source port */
	__be16 dport; /* funnel header destination port */
	__u8 pad[2];
};

/* Index of the per-CPU `stats` array: why a packet was left alone. */
enum sfunnel_stat {
	SFUNNEL_STAT_NOT_IP_TCP_UDP = 0, /* not IPv4 or IPv6 TCP/UDP */
	SFUNNEL_STAT_FRAGMENT = 1,   /* an IP fragment: no L4 header to trust */
	SFUNNEL_STAT_MALFORMED = 2,  /* truncated or inconsistent headers */
	SFUNNEL_STAT_MISS = 3,       /* no rule matched */
	SFUNNEL_STAT_TOO_BIG = 4,    /* funneling would overflow tot_len */
	SFUNNEL_STAT_ERROR = 5,      /* a helper failed; see the verdict */
	SFUNNEL_STAT_UNDECIDED = 6,  /* unfunnel auto: the inner header fits neither or both protocols */
	SFUNNEL_STAT_OVER_MTU = 7,   /* funneled, it would not fit the MTU */
	SFUNNEL_STAT_IPV6_EXT = 8,   /* IPv6 with extension headers (not a fragment) */
	SFUNNEL_STAT_MAX = 9,
};

/*
 * Per rule and CPU: `counters[cpu * counter_stride + rule index]`, one
 * cache-line-aligned block per CPU, so CPUs never share a line.
 */
#define COUNTERS_PER_LINE 2
struct sfunnel_counter {
	__u64 packets;  /* rewritten (or accepted/dropped) by the rule */
	__u64 bytes;
	__u64 over_mtu; /* funnel: left out because they would exceed the MTU */
	__u64 pad;
};

/* How an attachment is hooked in. */
enum sfunnel_attach_mode {
	SFUNNEL_MODE_TCX = 1,
	SFUNNEL_MODE_CLSACT = 2,
};

/*
 * `sf_meta[0]`: what the loader recorded about this attachment, so that a
 * later sfunnel (a rerun, status, gc) can tell what a program it finds on
 * a hook, or by its id, is for.  The datapath never reads it.
 */
struct sfunnel_meta {
	__u32 abi_version;  /* SFUNNEL_ABI_VERSION of the loader that made it */
	__u32 ifindex;
	__u32 mode;         /* enum sfunnel_attach_mode */
	__u32 egress;       /* 0: ingress, 1: egress */
	__u64 netns_cookie; /* the network namespace; the kernel never reuses it */
	__u64 netns_ino;    /* its inode, to find it by (reused once it is gone) */
	char ifname[16];    /* the interface's name at load */
	char version[16];   /* the loader's version (`bpftool map dump name sf_meta`) */
};

/*
 * `sf_detour[0]`: the segmentation detour of an attachment that funnels
 * (detour.h).
 * All zero: no detour, GSO packets are funneled as they are.
 */
struct sfunnel_detour {
	__u32 dev_ifindex; /* the interface the attachment is on */
	__u32 out_ifindex; /* helper end that GSO packets are sent out of */
	__u32 in_ifindex;  /* helper end that their segments come in on */
	__u32 flags;       /* SFUNNEL_DETOUR_* */
};

/* An ingress attachment: segments go back into dev's receive path. */
#define SFUNNEL_DETOUR_INGRESS 0x1
/* An egress attachment on a veth whose peer is in another namespace, with
 * no qdisc: segments go straight into the peer's receive path (detour.h). */
#define SFUNNEL_DETOUR_PEER 0x2
/* skb->cb[0] of a segment sent back into the receive path (cb[1]: the
 * helper end it came in on), so that the main program lets it pass. */
#define SFUNNEL_DETOUR_MARK 0x5F64746Fu

#endif /* SFUNNEL_H */
