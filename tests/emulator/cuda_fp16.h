/*
 * cuda_fp16.h for the SIMT emulator (simt.h): IEEE binary16 as its 16 bits, converted with the
 * compiler's _Float16 (correctly rounded, to nearest even; subnormals and overflow to infinity as
 * CUDA's __float2half_rn).
 */
#pragma once
#include <cstdint>
#include <cstring>

struct __half {
    uint16_t x;
};

inline float __half2float(__half h) {
    _Float16 v;
    std::memcpy(&v, &h.x, sizeof v);
    return (float)v;
}

inline __half __float2half_rn(float f) {
    const _Float16 v = (_Float16)f;
    __half h;
    std::memcpy(&h.x, &v, sizeof h.x);
    return h;
}
