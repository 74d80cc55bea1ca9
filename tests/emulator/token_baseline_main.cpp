/*
 * kernels/token_baseline.cu run on the host under simt.h (tests/kernel_emulation.rs drives it).
 * stdin, little-endian: int64 T, B, G, mask_u8, multi_turn, zero_tail, has_rho; double eps; float
 * rewards[T], old_logp[T], sum_pi_squared[T], rho[T] (if has_rho); mask[T] (uint8 or float);
 * int32 cu_seqlens[B + 1], group_offsets[G + 1], group_members[B].
 * stdout: float advantages[T], returns[T]; int32 bad[RECAP_OTB_BAD_SLOTS].
 */
#include "simt.h"
#include "token_baseline.cu"

#include <climits>
#include <cstdio>

template <class T>
static std::vector<T> read(size_t n) {
    std::vector<T> v(n + 1);
    if (n && fread(v.data(), sizeof(T), n, stdin) != n) {
        fprintf(stderr, "short input\n");
        exit(2);
    }
    return v;
}

int main() {
    const auto h = read<int64_t>(7);
    const int64_t t = h[0], b = h[1], g = h[2], mask_u8 = h[3];
    const double eps = read<double>(1)[0];
    auto r = read<float>(t), old = read<float>(t), spp = read<float>(t);
    auto rho = h[6] ? read<float>(t) : std::vector<float>();
    auto mask_b = mask_u8 ? read<uint8_t>(t) : std::vector<uint8_t>();
    auto mask_f = mask_u8 ? std::vector<float>() : read<float>(t);
    auto cu = read<int32_t>(b + 1), off = read<int32_t>(g + 1), mem = read<int32_t>(b);
    std::vector<double> sums(2 * t + 1);
    std::vector<int32_t> ints(t + b + 1), bad(RECAP_OTB_BAD_SLOTS, INT_MAX);
    std::vector<float> adv(t + 1), ret(t + 1);
    RecapOtbParams p{};
    p.token_rewards = (uint64_t)r.data();
    p.old_logp = (uint64_t)old.data();
    p.sum_pi_squared = (uint64_t)spp.data();
    p.rollout_is_weights = h[6] ? (uint64_t)rho.data() : 0;
    p.mask = mask_u8 ? (uint64_t)mask_b.data() : (uint64_t)mask_f.data();
    p.cu_seqlens = (uint64_t)cu.data();
    p.group_offsets = (uint64_t)off.data();
    p.group_members = (uint64_t)mem.data();
    p.cum_w = (uint64_t)sums.data();
    p.to_go = (uint64_t)(sums.data() + t);
    p.aligned = (uint64_t)ints.data();
    p.live = (uint64_t)(ints.data() + t);
    p.bad = (uint64_t)bad.data();
    p.advantages = (uint64_t)adv.data();
    p.returns = (uint64_t)ret.data();
    p.num_tokens = t;
    p.num_seqs = (int32_t)b;
    p.num_groups = (int32_t)g;
    p.multi_turn = (int32_t)h[4];
    p.zero_tail = (int32_t)h[5];
    p.eps = eps;
    if (t > 0) {
        simt_launch<RecapOtbParams>(mask_u8 ? recap_otb_scan_u8 : recap_otb_scan_f32, (int)b, RECAP_BLOCK, p);
        simt_launch<RecapOtbParams>(mask_u8 ? recap_otb_apply_u8 : recap_otb_apply_f32, (int)g, RECAP_BLOCK, p);
    }
    fwrite(adv.data(), sizeof(float), t, stdout);
    fwrite(ret.data(), sizeof(float), t, stdout);
    fwrite(bad.data(), sizeof(int32_t), bad.size(), stdout);
    return 0;
}
