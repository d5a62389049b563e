/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Internet checksum arithmetic.  Sums are kept in memory byte order, the way
 * bpf_csum_diff() returns them, so a folded sum can be stored as is.
 */
#ifndef SFUNNEL_CSUM_H
#define SFUNNEL_CSUM_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>

static __always_inline __u16 csum_fold(__u64 sum)
{
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

/* The 12-byte IPv4 pseudo-header of RFC 768/793. */
struct pseudo_hdr4 {
	__be32 saddr;
	__be32 daddr;
	__u8 zero;
	__u8 proto;
	__be16 len;
};

/*
 * Sum of an L4 segment (header and payload) whose checksum is valid for
 * the pseudo-header (0.0.0.0, 0.0.0.0, proto, len): the ones' complement
 * of that pseudo-header's sum.  No payload byte is read, so it is right
 * also when the checksum is completed later (CHECKSUM_PARTIAL).
 */
static __always_inline __u16 csum_segment_zero_addrs(__u8 proto, __u16 len)
{
	struct {
		__u8 zero;
		__u8 proto;
		__be16 len;
	} ph = { 0, proto, bpf_htons(len) };

	return ~csum_fold((__u32)bpf_csum_diff(NULL, 0, (__be32 *)&ph, sizeof(ph), 0));
}

#define CSUM_CHUNK 256
/* 64 KiB, the largest IPv4 packet, in CSUM_CHUNK pieces. */
#define CSUM_MAX_CHUNKS 256

/*
 * Sum of `len` bytes of the packet from `off`, read through
 * bpf_skb_load_bytes so paged data counts too.  Only needed for a UDP
 * segment sent without a checksum, whose sum is not implied by any field.
 * Returns -1 if the bytes could not be read.
 */
static __always_inline __s64 csum_skb_bytes(struct __sk_buff *skb, __u32 off, __u32 len)
{
	__u8 buf[CSUM_CHUNK];
	__u64 sum = 0;

	for (int i = 0; i < CSUM_MAX_CHUNKS; i++) {
		if (len == 0)
			break;
		__u32 n = len < CSUM_CHUNK ? len : CSUM_CHUNK;
		/* Pad the last piece with zeros to a multiple of 4. */
		__builtin_memset(buf, 0, sizeof(buf));
		/* Verifier workaround: restate n's bounds after the min(). */
		if (n == 0 || n > CSUM_CHUNK)
			return -1;
		if (bpf_skb_load_bytes(skb, off, buf, n))
			return -1;
		__u32 words = (n + 3) & ~3u;
		if (words > CSUM_CHUNK)
			return -1;
		__s64 s = bpf_csum_diff(NULL, 0, (__be32 *)buf, words, 0);
		if (s < 0)
			return -1;
		sum += (__u32)s;
		off += n;
		len -= n;
	}
	if (len)
		return -1;
	return csum_fold(sum);
}

#endif /* SFUNNEL_CSUM_H */
