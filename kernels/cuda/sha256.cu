// SHA-256 of fixed-size leaves of a device buffer, one thread per leaf
// (SHA-256 is sequential within a message). Compiled at run time by NVRTC
// (kernels/src/sha256.rs).
//
// Leaf `i` of a blob of `size` bytes is bytes [i * leaf_bytes, min((i + 1) *
// leaf_bytes, size)); only the blob's last leaf may be short, and a blob of
// 0 bytes has no leaves. `leaf_bytes` is a multiple of 64, and `data` is
// 16-byte aligned, so every whole 64-byte block is read with four 16-byte
// loads; the tail and the padding are assembled byte by byte.
//
// The launch covers leaves first_leaf .. first_leaf + leaf_count. When `out`
// is not null each digest is written to out[32 * i]. When `expect` is not
// null each digest is compared with expect[32 * i]: a mismatch raises
// `bad_count` and lowers `first_bad` (atomicMin) to the leaf's index.

typedef unsigned int u32;
typedef unsigned long long u64;

__constant__ u32 K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

__device__ __forceinline__ u32 rotr(u32 x, u32 n) { return __funnelshift_r(x, x, n); }
__device__ __forceinline__ u32 bswap(u32 x) { return __byte_perm(x, 0, 0x0123); }

// One compression of the 16 big-endian words in w into state s.
__device__ __forceinline__ void compress(u32 s[8], u32 w[16]) {
    u32 a = s[0], b = s[1], c = s[2], d = s[3], e = s[4], f = s[5], g = s[6], h = s[7];
#pragma unroll
    for (int i = 0; i < 64; i++) {
        u32 wi;
        if (i < 16) {
            wi = w[i];
        } else {
            u32 w15 = w[(i - 15) & 15], w2 = w[(i - 2) & 15];
            u32 s0 = rotr(w15, 7) ^ rotr(w15, 18) ^ (w15 >> 3);
            u32 s1 = rotr(w2, 17) ^ rotr(w2, 19) ^ (w2 >> 10);
            wi = w[i & 15] + s0 + w[(i - 7) & 15] + s1;
            w[i & 15] = wi;
        }
        u32 t1 = h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + wi;
        u32 t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        h = g;
        g = f;
        f = e;
        e = d + t1;
        d = c;
        c = b;
        b = a;
        a = t1 + t2;
    }
    s[0] += a; s[1] += b; s[2] += c; s[3] += d;
    s[4] += e; s[5] += f; s[6] += g; s[7] += h;
}

extern "C" __global__ void sha256_leaves(const unsigned char* __restrict__ data, u64 size, u64 first_leaf,
                                         u32 leaf_count, u32 leaf_bytes, const unsigned char* __restrict__ expect,
                                         unsigned char* __restrict__ out, u64* first_bad, u32* bad_count) {
    u32 t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= leaf_count) return;
    u64 leaf = first_leaf + t;
    u64 start = leaf * (u64)leaf_bytes;
    if (start >= size && !(size == 0 && leaf == 0)) return;
    u64 len = size - start < (u64)leaf_bytes ? size - start : (u64)leaf_bytes;
    u32 s[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    u32 w[16];
    const unsigned char* p = data + start;
    u64 whole = len / 64;
    // Software pipelining: the next block's four loads are issued before
    // this block's 64 rounds, so their latency (hundreds of cycles from
    // device memory) hides behind the rounds instead of adding to them.
    // A thread's leaf is sequential work, so this latency is what bounds
    // the rate when few leaves are in flight (the last window of a load).
    const uint4* q = (const uint4*)p;
    uint4 n[4] = {make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0)};
    if (whole > 0) {
#pragma unroll
        for (int k = 0; k < 4; k++) n[k] = __ldg(q + k);
    }
    for (u64 blk = 0; blk < whole; blk++) {
        uint4 c[4];
#pragma unroll
        for (int k = 0; k < 4; k++) c[k] = n[k];
        if (blk + 1 < whole) {
            const uint4* nq = q + 4 * (blk + 1);
#pragma unroll
            for (int k = 0; k < 4; k++) n[k] = __ldg(nq + k);
        }
#pragma unroll
        for (int k = 0; k < 4; k++) {
            w[4 * k] = bswap(c[k].x);
            w[4 * k + 1] = bswap(c[k].y);
            w[4 * k + 2] = bswap(c[k].z);
            w[4 * k + 3] = bswap(c[k].w);
        }
        compress(s, w);
    }
    // Tail: 0..63 message bytes, the 0x80 marker, zeros, the 64-bit length.
    u32 rest = (u32)(len - whole * 64);
    const unsigned char* tail = p + whole * 64;
#pragma unroll
    for (int k = 0; k < 16; k++) w[k] = 0;
    for (u32 i = 0; i < rest; i++) w[i / 4] |= (u32)tail[i] << (24 - 8 * (i % 4));
    w[rest / 4] |= 0x80u << (24 - 8 * (rest % 4));
    u64 bits = len * 8;
    if (rest >= 56) {
        compress(s, w);
#pragma unroll
        for (int k = 0; k < 16; k++) w[k] = 0;
    }
    w[14] = (u32)(bits >> 32);
    w[15] = (u32)bits;
    compress(s, w);
    bool mismatch = false;
#pragma unroll
    for (int k = 0; k < 8; k++) {
        u32 be = bswap(s[k]);
        if (out) ((u32*)(out + 32 * (u64)t))[k] = be;
        if (expect) {
            const unsigned char* e = expect + 32 * (u64)t + 4 * k;
            u32 want = (u32)e[0] | ((u32)e[1] << 8) | ((u32)e[2] << 16) | ((u32)e[3] << 24);
            mismatch |= be != want;
        }
    }
    if (mismatch) {
        atomicAdd(bad_count, 1u);
        atomicMin(first_bad, leaf);
    }
}
