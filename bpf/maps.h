/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The maps of one attachment (one netns/interface/direction).  User space
 * writes them; the datapath only reads them, except for the counters.
 */
#ifndef SFUNNEL_MAPS_H
#define SFUNNEL_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "sfunnel.h"

/* The generation in use (0 or 1).  Flipping it swaps rulesets atomically. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} sf_active SEC(".maps");

/* Per generation: which shapes its rules use. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, GENERATIONS);
	__type(key, __u32);
	__type(value, struct sfunnel_params);
} sf_params SEC(".maps");

/*
 * Per generation and port: the port's class and the shapes it allows.
 * Mmapable, so user space writes a generation's 65536 entries with plain
 * stores instead of 65536 map updates.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, GENERATIONS * PORT_SPACE);
	__type(key, __u32);
	__type(value, struct sfunnel_port_class);
} sf_ports SEC(".maps");

/*
 * The per-generation tables below are inner maps, sized by user space for
 * the ruleset it loads.  Replacing a slot waits for running programs
 * (synchronize_rcu), so the old generation can be dropped safely.
 *
 * Kernel workaround (6.1): the inner-map templates give key and value
 * sizes, not BTF types.  Our inner maps are created without BTF, and 6.1
 * refuses an inner map whose BTF record differs from the template's (an
 * empty record is not equal to none there).  The shared types still reach
 * the skeleton through `btf_types` below.
 */
struct addr_trie {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1);
	__uint(key_size, sizeof(struct sfunnel_addr_key));
	__uint(value_size, sizeof(struct sfunnel_addr_class));
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, GENERATIONS);
	__type(key, __u32);
	__array(values, struct addr_trie);
} sf_addr_maps SEC(".maps");

struct rule_table {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1);
	__uint(key_size, sizeof(struct sfunnel_rule_key));
	__uint(value_size, sizeof(struct sfunnel_rule_val));
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, GENERATIONS);
	__type(key, __u32);
	__array(values, struct rule_table);
} sf_rule_maps SEC(".maps");

/*
 * Per-CPU counters as a plain array with one block per CPU (see
 * sfunnel.h): a per-CPU array cannot be an inner map of varying size
 * (BPF_F_INNER_MAP excludes per-CPU maps), and a per-CPU hash costs a hash
 * lookup per packet.  Mmapable, so `status` reads it in one go.  The kernel
 * zeroes a new array: a generation's counters start at 0.
 */
struct counter_table {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_INNER_MAP | BPF_F_MMAPABLE);
	__uint(max_entries, 1);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(struct sfunnel_counter));
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, GENERATIONS);
	__type(key, __u32);
	__array(values, struct counter_table);
} sf_counter_maps SEC(".maps");

/*
 * The ruleset's canonical text, per generation, for `status`: user space
 * writes and reads it; the datapath never does.
 */
struct text_table {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_INNER_MAP);
	__uint(max_entries, 1);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, RULESET_TEXT_CHUNK);
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, GENERATIONS);
	__type(key, __u32);
	__array(values, struct text_table);
} sf_text_maps SEC(".maps");

/* Per-CPU counts of packets the datapath left alone, by reason. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SFUNNEL_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} sf_stats SEC(".maps");

/*
 * Per-CPU scratch space for mtu.h (the FIB lookup's parameters, then the
 * ICMP reply it builds): with the rest of the program's frame they would
 * not fit the 512-byte stack.
 */
#define SCRATCH_SIZE 192
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, SCRATCH_SIZE);
} sf_scratch SEC(".maps");

/* The segmentation detour (detour.h); written by the loader. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sfunnel_detour);
} sf_detour SEC(".maps");

/* Loader bookkeeping; the datapath never reads it. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sfunnel_meta);
} sf_meta SEC(".maps");

/*
 * BTF workaround: the inner maps' key and value types appear in no map
 * definition now, so clang would leave them out of BTF and the skeleton
 * would lack them.  One unused global of each keeps them in.
 */
struct {
	struct sfunnel_addr_key addr_key;
	struct sfunnel_addr_class addr_class;
	struct sfunnel_rule_key rule_key;
	struct sfunnel_rule_val rule_val;
	struct sfunnel_counter counter;
} btf_types;

#endif /* SFUNNEL_MAPS_H */
