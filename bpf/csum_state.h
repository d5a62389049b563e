/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Whether a packet's L4 checksum is still owed by the kernel
 * (CHECKSUM_PARTIAL: sent by a local socket with checksum offload).
 *
 * Such a packet has its checksum completed later, from csum_start, which
 * points at its own L4 header: after a funnel, at the *inner* header.  A
 * NAT on the way (kube-proxy's DNAT on the sender's node, say) takes the
 * L4 header after the IP header for the one owed, and updates the funnel
 * header's complete checksum as if it were the pseudo-header seed: wrong
 * after any address change, and a port change is skipped.  No helper lets
 * a tc program complete the checksum or move csum_start, so such a packet
 * is funneled in the segmentation detour (detour.h), whose out end has no
 * checksum offload: the kernel completes the checksum there
 * (skb_checksum_help, or the segmenter), and the funneled packet leaves as
 * plain bytes that every NAT updates correctly.
 *
 * ip_summed is not in struct __sk_buff; bpf_cast_to_kern_ctx (Linux 6.2)
 * gives a read-only view of the kernel's sk_buff, relocated by CO-RE.
 * Where the kernel lacks it, the answer is "maybe", and the caller takes
 * the detour for every packet it funnels.
 */
#ifndef SFUNNEL_CSUM_STATE_H
#define SFUNNEL_CSUM_STATE_H

#include <linux/bpf.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_helpers.h>

/* include/linux/skbuff.h */
#define SFUNNEL_CHECKSUM_PARTIAL 3

/* The kernel's sk_buff, only the field read here (CO-RE: the ___ suffix
 * names a local flavour of `struct sk_buff`). */
struct sk_buff___sfunnel {
	__u8 ip_summed : 2;
} __attribute__((preserve_access_index));

extern void *bpf_cast_to_kern_ctx(void *obj) __ksym __weak;

/* 1: the checksum is owed (or, on a kernel before 6.2, may be); 0: it is
 * in the packet's bytes. */
static __always_inline int csum_owed(struct __sk_buff *skb)
{
	if (!bpf_ksym_exists(bpf_cast_to_kern_ctx))
		return 1;
	struct sk_buff___sfunnel *k = bpf_cast_to_kern_ctx(skb);

	return BPF_CORE_READ_BITFIELD(k, ip_summed) == SFUNNEL_CHECKSUM_PARTIAL;
}

#endif /* SFUNNEL_CSUM_STATE_H */
