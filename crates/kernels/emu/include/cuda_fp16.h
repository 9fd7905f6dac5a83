// The emulator's stand-in for CUDA's cuda_fp16.h: IEEE binary16 storage with
// round-to-nearest-even conversions (subnormals, overflow to infinity, NaN kept).
#pragma once
#include "sft_emu.h"

struct __half {
    uint16_t __x;
};

inline float __half2float(__half h) {
    uint32_t x = h.__x;
    uint32_t sign = (x & 0x8000u) << 16;
    uint32_t exp = x & 0x7c00u, man = x & 0x03ffu;
    uint32_t u;
    if ((x & 0x7fffu) == 0) {
        u = sign;
    } else if (exp == 0x7c00u) {
        u = man == 0 ? (sign | 0x7f800000u) : (sign | 0x7fc00000u | (man << 13));
    } else if (exp == 0) {
        // subnormal: normalise the mantissa
        int e = __builtin_clz(man) - 21;  // leading zeros within the 10-bit mantissa, plus one
        u = sign | (static_cast<uint32_t>(127 - 15 - e + 1) << 23) | ((man << (13 + e)) & 0x7fffffu);
    } else {
        u = sign | (((exp >> 10) - 15 + 127) << 23) | (man << 13);
    }
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline __half __float2half_rn(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    uint32_t sign = (x & 0x80000000u) >> 16;
    uint32_t exp = x & 0x7f800000u, man = x & 0x007fffffu;
    if (exp == 0x7f800000u) {
        uint32_t nan = man == 0 ? 0 : 0x0200u;
        return {static_cast<uint16_t>(sign | 0x7c00u | nan | (man >> 13))};
    }
    int half_exp = static_cast<int>(exp >> 23) - 127 + 15;
    if (half_exp >= 0x1f) return {static_cast<uint16_t>(sign | 0x7c00u)};
    if (half_exp <= 0) {
        if (14 - half_exp > 24) return {static_cast<uint16_t>(sign)};
        man |= 0x00800000u;
        uint32_t half_man = man >> (14 - half_exp);
        uint32_t round_bit = 1u << (13 - half_exp);
        if ((man & round_bit) != 0 && (man & (3 * round_bit - 1)) != 0) half_man += 1;
        return {static_cast<uint16_t>(sign | half_man)};
    }
    uint32_t he = static_cast<uint32_t>(half_exp) << 10, hm = man >> 13;
    uint32_t round_bit = 0x00001000u;
    uint32_t r = sign | he | hm;
    if ((man & round_bit) != 0 && (man & (3 * round_bit - 1)) != 0) r += 1;
    return {static_cast<uint16_t>(r)};
}
inline __half __float2half(float f) { return __float2half_rn(f); }
inline __half __ushort_as_half(unsigned short bits) { return {bits}; }
