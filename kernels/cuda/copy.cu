// Host-to-device copy by the SMs instead of a copy engine: the threads read
// page-locked, device-mapped host memory over PCIe with 16-byte loads and
// write device memory. Compiled at run time by NVRTC (kernels/src/stream.rs).
//
// `src` and `dst` are 16-byte aligned (the caller checks and otherwise uses a
// copy engine); `bytes` may end in a partial vector, copied bytewise.

typedef unsigned long long u64;

extern "C" __global__ void copy_from_host(const uint4* __restrict__ src, uint4* __restrict__ dst, u64 bytes) {
    u64 vectors = bytes / 16;
    u64 stride = (u64)gridDim.x * blockDim.x;
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    // Four independent loads in flight per thread before the first store.
    for (; i + 3 * stride < vectors; i += 4 * stride) {
        uint4 a = src[i];
        uint4 b = src[i + stride];
        uint4 c = src[i + 2 * stride];
        uint4 d = src[i + 3 * stride];
        dst[i] = a;
        dst[i + stride] = b;
        dst[i + 2 * stride] = c;
        dst[i + 3 * stride] = d;
    }
    for (; i < vectors; i += stride) dst[i] = src[i];
    if (blockIdx.x == 0 && threadIdx.x < bytes % 16) {
        u64 at = vectors * 16 + threadIdx.x;
        ((unsigned char*)dst)[at] = ((const unsigned char*)src)[at];
    }
}
