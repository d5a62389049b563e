/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Internet checksum arithmetic.  Sums are kept in memory byte order, the way
 * bpf_csum_diff() returns them, so a folded sum can be stored as is.
 */
#ifndef SFUNNEL_CSUM_H
#define SFUNNEL_CSUM_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

static __always_inline __u16 csum_fold(__u64 sum)
{
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

/* Both 16-bit halves of a 32-bit word, for adding to a sum. */
static __always_inline __u32 csum_word32(__be32 w)
{
	return (w & 0xffff) + (w >> 16);
}

/*
 * Sum of the IPv4 pseudo-header of RFC 768/793, without the addresses.
 * proto is a byte at an odd offset of its 16-bit word: bpf_htons() puts
 * it there in memory order.
 */
static __always_inline __u32 csum_pseudo_proto_len(__u8 proto, __u16 len)
{
	return bpf_htons(proto) + bpf_htons(len);
}

/*
 * Sum of an L4 segment (header and payload) whose checksum is valid for
 * the pseudo-header (0.0.0.0, 0.0.0.0, proto, len): the ones' complement
 * of that pseudo-header's sum.  No payload byte is read, so it is right
 * also when the checksum is completed later (CHECKSUM_PARTIAL).
 */
static __always_inline __u16 csum_segment_zero_addrs(__u8 proto, __u16 len)
{
	return ~csum_fold(csum_pseudo_proto_len(proto, len));
}

/* RFC 1624 eqn. 3: the checksum after one 16-bit word changes. */
static __always_inline __sum16 csum_replace16(__sum16 check, __be16 from, __be16 to)
{
	return ~csum_fold((__u32)(__u16)~check + (__u16)~from + to);
}

/* Its buffer is on the bpf_loop callback's stack, which adds to the caller's. */
#define CSUM_CHUNK 128

struct csum_walk {
	struct __sk_buff *skb;
	__u32 off;
	__u32 len;
	__u64 sum;
	int err;
};

static long csum_chunk(__u64 i, void *data)
{
	struct csum_walk *w = data;
	__u8 buf[CSUM_CHUNK];
	__u64 done = i * CSUM_CHUNK;

	if (done >= w->len)
		return 1;
	__u64 n = w->len - done;
	if (n > CSUM_CHUNK)
		n = CSUM_CHUNK;
	/* Pad the last piece with zeros to a multiple of 4. */
	__builtin_memset(buf, 0, sizeof(buf));
	/*
	 * Verifier workaround: the empty asm keeps clang from dropping a bounds
	 * check it can prove redundant but the verifier cannot.
	 */
	asm volatile("" : "+r"(n));
	/* Verifier workaround (6.1): a signed compare, since that verifier
	 * learns no lower bound from n == 0. */
	if ((__s64)n < 1 || n > CSUM_CHUNK)
		goto fail;
	if (bpf_skb_load_bytes(w->skb, w->off + done, buf, n))
		goto fail;
	__u64 words = (n + 3) & ~3ull;
	if (words > CSUM_CHUNK)
		goto fail;
	__s64 s = bpf_csum_diff(NULL, 0, (__be32 *)buf, words, 0);
	if (s < 0)
		goto fail;
	w->sum += (__u32)s;
	return 0;
fail:
	w->err = 1;
	return 1;
}

/*
 * Sum of `len` bytes of the packet from `off`, read through
 * bpf_skb_load_bytes so paged data counts too.  Only needed for a UDP
 * segment sent without a checksum, whose sum no header field implies.
 * Returns -1 if the bytes could not be read.  bpf_loop keeps the verifier
 * to one pass over the chunk code.
 */
static __always_inline int csum_skb_bytes(struct __sk_buff *skb, __u32 off, __u32 len)
{
	struct csum_walk w = { .skb = skb, .off = off, .len = len };
	__u32 chunks = (len + CSUM_CHUNK - 1) / CSUM_CHUNK;

	if (bpf_loop(chunks, csum_chunk, &w, 0) < 0 || w.err)
		return -1;
	return csum_fold(w.sum);
}

#endif /* SFUNNEL_CSUM_H */
