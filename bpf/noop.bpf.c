// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* The cheapest TC program: the floor that the benchmarks measure against. */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

SEC("tc")
int noop(struct __sk_buff *skb)
{
	return TC_ACT_UNSPEC;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
