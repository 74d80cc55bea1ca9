/* The C ABI's device path from C: arrays in device memory of device 0's primary context (allocated
 * and copied with the CUDA driver API, loaded with dlopen as a C caller without the toolkit would),
 * the ops called with device = 0 and compared with the same ops on the host (device = -1, the CPU
 * reference). Runs on a GPU, and on the emulated device (scripts/emulated-gpu.sh). Prints "ok". */
#include <dlfcn.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include "recap_kernels.h"
#include "batch_util.h"

#define CHECK(c) do { if (!(c)) { printf("FAILED line %d: %s (last error: %s)\n", __LINE__, #c, recap_last_error()); return 1; } } while (0)

typedef unsigned long long dptr;
static int (*cu_init)(unsigned);
static int (*cu_device_get)(int*, int);
static int (*cu_retain)(void**, int);
static int (*cu_set_current)(void*);
static int (*cu_alloc)(dptr*, size_t);
static int (*cu_free)(dptr);
static int (*cu_htod)(dptr, const void*, size_t);
static int (*cu_dtoh)(void*, dptr, size_t);

static int load_driver(void) {
    void* lib = dlopen("libcuda.so", RTLD_NOW);
    if (!lib) lib = dlopen("libcuda.so.1", RTLD_NOW);
    if (!lib) return 0;
#define SYM(v, name) *(void**)&v = dlsym(lib, name); if (!v) return 0
    SYM(cu_init, "cuInit");
    SYM(cu_device_get, "cuDeviceGet");
    SYM(cu_retain, "cuDevicePrimaryCtxRetain");
    SYM(cu_set_current, "cuCtxSetCurrent");
    SYM(cu_alloc, "cuMemAlloc_v2");
    SYM(cu_free, "cuMemFree_v2");
    SYM(cu_htod, "cuMemcpyHtoD_v2");
    SYM(cu_dtoh, "cuMemcpyDtoH_v2");
    int dev;
    void* ctx;
    return cu_init(0) == 0 && cu_device_get(&dev, 0) == 0 && cu_retain(&ctx, dev) == 0 && cu_set_current(ctx) == 0;
}

static dptr up(const void* x, size_t bytes) {
    dptr d = 0;
    if (cu_alloc(&d, bytes) != 0 || cu_htod(d, x, bytes) != 0) return 0;
    return d;
}

static int close_to(double a, double b, double tol) { return fabs(a - b) <= tol * (1.0 + fabs(b)); }

#define T 300
#define B 3
#define V 50

int main(void) {
    if (!load_driver()) {
        printf("FAILED: no CUDA driver (libcuda.so) to load\n");
        return 1;
    }
    /* a batch of three sequences (200, 0 and 100 tokens), every 7th token masked */
    static float logp[T], old[T], ref[T], grad_h[T], grad_d[T], kl_h[T], kl_d[T], kg_h[T], kg_d[T];
    static uint8_t mask[T];
    float adv[B] = {0.7f, -0.3f, -1.1f};
    int32_t cu[B + 1] = {0, 200, 200, 300};
    for (int t = 0; t < T; ++t) {
        logp[t] = -1.0f - 0.01f * (float)(t % 37);
        old[t] = logp[t] + 0.05f * (float)((t * 13) % 9 - 4) / 4.0f;
        ref[t] = logp[t] - 0.02f * (float)((t * 7) % 5);
        mask[t] = (t % 7) != 3;
    }
    float lambda[1] = {1.0f};
    int32_t kinds[1] = {0};
    RecapGrpoConfig cfg;
    CHECK(recap_grpo_config_default(&cfg) == RECAP_OK);
    cfg.kl_coef = 0.1f;
    RecapGrpoResult rh, rd;
    double sh[64], sd[64];
    CHECK(recap_grpo_stats_len(1) <= 64);

    /* the fused loss: the same batch on the host (hb) and on the device (db) */
    RecapGrpoBatch hb = test_batch(T, B, old, adv, mask, 1, cu, lambda, kinds);
    hb.ref_logp = ref;
    CHECK(recap_grpo_loss(-1, NULL, logp, &hb, &cfg, grad_h, &rh, sh) == RECAP_OK);
    dptr d_logp = up(logp, sizeof logp), d_old = up(old, sizeof old), d_ref = up(ref, sizeof ref);
    dptr d_adv = up(adv, sizeof adv), d_mask = up(mask, sizeof mask), d_grad = up(grad_d, sizeof grad_d);
    CHECK(d_logp && d_old && d_ref && d_adv && d_mask && d_grad);
    RecapGrpoBatch db = test_batch(T, B, (const float*)d_old, (const float*)d_adv, (const void*)d_mask, 1, cu, lambda,
                                   kinds);
    db.ref_logp = (const float*)d_ref;
    CHECK(recap_grpo_loss(0, NULL, (const float*)d_logp, &db, &cfg, (float*)d_grad, &rd, sd) == RECAP_OK);
    CHECK(cu_dtoh(grad_d, d_grad, sizeof grad_d) == 0);
    CHECK(close_to(rd.loss, rh.loss, 1e-5) && rd.num_tokens == rh.num_tokens);
    CHECK(close_to(rd.kl_loss, rh.kl_loss, 1e-5));
    for (int t = 0; t < T; ++t) CHECK(close_to(grad_d[t], grad_h[t], 1e-5));
    for (int64_t i = 0; i < recap_grpo_stats_len(1); ++i) CHECK(close_to(sd[i], sh[i], 1e-5));

    /* the asynchronous fused loss: the layout on the host, then on the device; the output read
     * back separately gives the synchronous call's bits */
    {
        const int64_t n_out = recap_grpo_output_len(1);
        CHECK(n_out > 0 && n_out <= 128 && recap_grpo_output_len(0) == -1);
        static double out_h[128];
        float grad_a[T];
        dptr d_out = up(out_h, (size_t)n_out * sizeof(double));
        dptr d_cu = up(cu, sizeof cu), d_lambda = up(lambda, sizeof lambda), d_grad2 = up(grad_d, sizeof grad_d);
        CHECK(d_out && d_cu && d_lambda && d_grad2);
        for (int on_device = 0; on_device < 2; ++on_device) {
            RecapGrpoResult ra;
            double sa[64];
            RecapGrpoBatch ab = db;
            ab.layout_on_device = on_device;
            ab.cu_seqlens = on_device ? (const int32_t*)d_cu : cu;
            ab.lambda = on_device ? (const float*)d_lambda : lambda;
            CHECK(recap_grpo_loss_async(0, NULL, (const float*)d_logp, &ab, &cfg, (float*)d_grad2, (double*)d_out) ==
                  RECAP_OK);
            CHECK(recap_grpo_output_read(0, NULL, &ab, &cfg, (const double*)d_out, &ra, sa) == RECAP_OK);
            CHECK(ra.loss == rd.loss && ra.kl_loss == rd.kl_loss && ra.num_tokens == rd.num_tokens);
            for (int64_t i = 0; i < recap_grpo_stats_len(1); ++i) CHECK(sa[i] == sd[i]);
            CHECK(cu_dtoh(grad_a, d_grad2, sizeof grad_a) == 0);
            for (int t = 0; t < T; ++t) CHECK(grad_a[t] == grad_d[t]);
            CHECK(cu_dtoh(out_h, d_out, (size_t)n_out * sizeof(double)) == 0);
            CHECK(out_h[0] == rd.loss); /* the device-resident loss */
        }
        /* on the host the same entry points fill the same layout (the CPU reference) */
        {
            static double out_host[128];
            float grad_hh[T];
            RecapGrpoResult rhh;
            CHECK(recap_grpo_loss_async(-1, NULL, logp, &hb, &cfg, grad_hh, out_host) == RECAP_OK);
            CHECK(recap_grpo_output_read(-1, NULL, &hb, &cfg, out_host, &rhh, NULL) == RECAP_OK);
            CHECK(rhh.loss == rh.loss && out_host[0] == rh.loss && rhh.num_tokens == rh.num_tokens);
            for (int t = 0; t < T; ++t) CHECK(grad_hh[t] == grad_h[t]);
        }
        /* a device layout that fails its device-side check: the read names the argument */
        int32_t bad_cu[B + 1];
        for (int i = 0; i <= B; ++i) bad_cu[i] = cu[B - i];
        CHECK(cu_htod(d_cu, bad_cu, sizeof bad_cu) == 0);
        RecapGrpoResult rb;
        RecapGrpoBatch bb = db;
        bb.layout_on_device = 1;
        bb.cu_seqlens = (const int32_t*)d_cu;
        bb.lambda = (const float*)d_lambda;
        CHECK(recap_grpo_loss_async(0, NULL, (const float*)d_logp, &bb, &cfg, (float*)d_grad2, (double*)d_out) ==
              RECAP_OK);
        CHECK(recap_grpo_output_read(0, NULL, &bb, &cfg, (const double*)d_out, &rb, NULL) != RECAP_OK);
        CHECK(strstr(recap_last_error(), "cu_seqlens") != NULL);
    }

    /* KL per token */
    CHECK(recap_kl(-1, NULL, T, logp, ref, mask, 1, 3, kl_h, kg_h) == RECAP_OK);
    dptr d_kl = up(kl_d, sizeof kl_d), d_kg = up(kg_d, sizeof kg_d);
    CHECK(recap_kl(0, NULL, T, (const float*)d_logp, (const float*)d_ref, (const void*)d_mask, 1, 3, (float*)d_kl,
                   (float*)d_kg) == RECAP_OK);
    CHECK(cu_dtoh(kl_d, d_kl, sizeof kl_d) == 0 && cu_dtoh(kg_d, d_kg, sizeof kg_d) == 0);
    for (int t = 0; t < T; ++t) CHECK(close_to(kl_d[t], kl_h[t], 1e-6) && close_to(kg_d[t], kg_h[t], 1e-6));

    /* log-probabilities and entropy from logits */
    static float z[T * V];
    static int32_t labels[T];
    static float lp_h[T], ent_h[T], lse_h[T], spp_h[T], lp_d[T], ent_d[T], lse_d[T], spp_d[T];
    for (int i = 0; i < T * V; ++i) z[i] = (float)((i * 37) % 101) / 25.0f - 2.0f;
    for (int t = 0; t < T; ++t) labels[t] = (t % 11 == 5) ? -100 : (t * 17) % V;
    CHECK(recap_logprob_forward(-1, NULL, TEST_LOGITS(z, 0, T, V, V, labels, 0.7f), lp_h, ent_h, lse_h, spp_h) == RECAP_OK);
    dptr d_z = up(z, sizeof z), d_y = up(labels, sizeof labels);
    dptr d_lp = up(lp_d, sizeof lp_d), d_ent = up(ent_d, sizeof ent_d), d_lse = up(lse_d, sizeof lse_d);
    dptr d_spp = up(spp_d, sizeof spp_d);
    CHECK(recap_logprob_forward(0, NULL, TEST_LOGITS((const void*)d_z, 0, T, V, V, (const int32_t*)d_y, 0.7f), (float*)d_lp,
                                (float*)d_ent, (float*)d_lse, (float*)d_spp) == RECAP_OK);
    CHECK(cu_dtoh(lp_d, d_lp, sizeof lp_d) == 0 && cu_dtoh(ent_d, d_ent, sizeof ent_d) == 0 &&
          cu_dtoh(lse_d, d_lse, sizeof lse_d) == 0 && cu_dtoh(spp_d, d_spp, sizeof spp_d) == 0);
    for (int t = 0; t < T; ++t)
        CHECK(close_to(lp_d[t], lp_h[t], 1e-5) && close_to(ent_d[t], ent_h[t], 1e-5) && close_to(lse_d[t], lse_h[t], 1e-5) &&
              close_to(spp_d[t], spp_h[t], 1e-5));

    /* the fused-linear loss, synchronous and asynchronous (layout on the host, then on the device):
     * the same values (the same bits where every row carries loss, tests/async_logits.rs); on the
     * host the asynchronous entry point fills the same layout */
    {
#define H 8
        static uint16_t hid[T * H], wt[V * H], dh_a[T * H], dh_s[T * H];
        static float dw_a[V * H], dw_s[V * H];
        for (int i = 0; i < T * H; ++i) {
            float f = (float)((i * 29) % 65) / 64.0f - 0.5f;
            uint32_t u;
            memcpy(&u, &f, 4);
            hid[i] = (uint16_t)(u >> 16); /* bf16: the upper half of an f32 */
        }
        for (int i = 0; i < V * H; ++i) {
            float f = (float)((i * 13) % 31) / 32.0f - 0.4f;
            uint32_t u;
            memcpy(&u, &f, 4);
            wt[i] = (uint16_t)(u >> 16);
        }
        const int64_t n_out = recap_logits_output_len(1);
        RecapFusedLinearOptions lo;
        CHECK(recap_fused_linear_options_default(&lo) == RECAP_OK);
        lo.chunk_tokens = 128;
        const int64_t ws_bytes = recap_fused_linear_workspace_len(T, B, 1, V, &lo);
        CHECK(n_out > 0 && n_out <= 128 && ws_bytes > 0 && recap_logits_output_len(17) == -1);
        dptr d_h = up(hid, sizeof hid), d_w = up(wt, sizeof wt), d_dh = up(dh_s, sizeof dh_s), d_dw = up(dw_s, sizeof dw_s);
        dptr d_ws = 0, d_out2 = 0, d_cu2 = up(cu, sizeof cu), d_lam2 = up(lambda, sizeof lambda);
        CHECK(cu_alloc(&d_ws, (size_t)ws_bytes) == 0 && cu_alloc(&d_out2, (size_t)n_out * sizeof(double)) == 0);
        CHECK(d_h && d_w && d_dh && d_dw && d_cu2 && d_lam2);
        RecapGrpoResult rs, ra;
        double ss[64], sa[64];
        RecapLinearHead dhead = {H, V, (const void*)d_h, (const void*)d_w, (const int32_t*)d_y};
        RecapLinearHead hhead = {H, V, hid, wt, labels};
        CHECK(recap_fused_linear_grpo_loss(0, NULL, &dhead, &db, &cfg, &lo, (void*)d_dh, (float*)d_dw, &rs, ss) ==
              RECAP_OK);
        CHECK(cu_dtoh(dh_s, d_dh, sizeof dh_s) == 0 && cu_dtoh(dw_s, d_dw, sizeof dw_s) == 0);
        for (int on_device = 0; on_device < 2; ++on_device) {
            RecapGrpoBatch ab = db;
            ab.layout_on_device = on_device;
            ab.cu_seqlens = on_device ? (const int32_t*)d_cu2 : cu;
            ab.lambda = on_device ? (const float*)d_lam2 : lambda;
            CHECK(recap_fused_linear_grpo_loss_async(0, NULL, &dhead, &ab, &cfg, &lo, (void*)d_ws, ws_bytes, (void*)d_dh,
                                                     (float*)d_dw, (double*)d_out2) == RECAP_OK);
            CHECK(recap_logits_output_read(0, NULL, &dhead, &ab, &cfg, &lo, (const double*)d_out2, &ra, sa) == RECAP_OK);
            /* the mask drops rows, which the synchronous call leaves out of its GEMMs and the
             * asynchronous one computes (with zero gradient): the same values to rounding */
            CHECK(close_to(ra.loss, rs.loss, 1e-5) && ra.num_tokens == rs.num_tokens &&
                  close_to(ra.kl_loss, rs.kl_loss, 1e-5));
            for (int64_t i = 0; i < recap_grpo_stats_len(1); ++i) CHECK(close_to(sa[i], ss[i], 1e-5));
            CHECK(cu_dtoh(dh_a, d_dh, sizeof dh_a) == 0 && cu_dtoh(dw_a, d_dw, sizeof dw_a) == 0);
            for (int i = 0; i < T * H; ++i) {
                uint32_t ua = (uint32_t)dh_a[i] << 16, us = (uint32_t)dh_s[i] << 16;
                float fa, fs;
                memcpy(&fa, &ua, 4);
                memcpy(&fs, &us, 4);
                CHECK(close_to(fa, fs, 1e-2) && (mask[i / H] || fs == 0.0f));
            }
            for (int i = 0; i < V * H; ++i) CHECK(close_to(dw_a[i], dw_s[i], 1e-3));
        }
        /* the host: the reference, synchronous and into the asynchronous layout */
        static double out_host[128];
        RecapGrpoResult rh2, rh3;
        CHECK(recap_fused_linear_grpo_loss(-1, NULL, &hhead, &hb, &cfg, &lo, dh_a, dw_a, &rh2, NULL) == RECAP_OK);
        CHECK(recap_fused_linear_grpo_loss_async(-1, NULL, &hhead, &hb, &cfg, &lo, NULL, 0, dh_a, dw_a, out_host) ==
              RECAP_OK);
        CHECK(recap_logits_output_read(-1, NULL, &hhead, &hb, &cfg, &lo, out_host, &rh3, NULL) == RECAP_OK);
        CHECK(rh3.loss == rh2.loss && out_host[0] == rh2.loss && close_to(rh3.loss, rs.loss, 1e-3));

        /* the batch-invariant mode: the synchronous call gives the same values to rounding; the
         * asynchronous one refuses it, naming it */
        RecapFusedLinearOptions inv = lo;
        inv.batch_invariant = 1;
        RecapGrpoResult ri;
        CHECK(recap_fused_linear_grpo_loss(0, NULL, &dhead, &db, &cfg, &inv, (void*)d_dh, (float*)d_dw, &ri, NULL) ==
              RECAP_OK);
        CHECK(close_to(ri.loss, rs.loss, 1e-5) && ri.num_tokens == rs.num_tokens);
        CHECK(recap_fused_linear_grpo_loss_async(0, NULL, &dhead, &db, &cfg, &inv, (void*)d_ws, ws_bytes, (void*)d_dh,
                                                 (float*)d_dw, (double*)d_out2) == RECAP_ERR_ARGUMENT);
        CHECK(strstr(recap_last_error(), "batch_invariant") != NULL);

        /* a rollout IS correction and f32 mask weights through the fused-linear loss: device vs host */
        {
            static float roll[T], wmask[T];
            for (int t = 0; t < T; ++t) {
                roll[t] = old[t] + 0.03f * (float)((t * 5) % 7 - 3) / 3.0f;
                wmask[t] = mask[t] ? 0.5f + 0.25f * (float)(t % 3) : 0.0f;
            }
            RecapGrpoConfig rc = cfg;
            rc.rollout_level = RECAP_IS_TOKEN;
            RecapGrpoBatch hr = hb, dr = db;
            hr.rollout_logp = roll;
            hr.mask = wmask;
            hr.mask_is_u8 = 0;
            dptr d_roll = up(roll, sizeof roll), d_wm = up(wmask, sizeof wmask);
            CHECK(d_roll && d_wm);
            dr.rollout_logp = (const float*)d_roll;
            dr.mask = (const void*)d_wm;
            dr.mask_is_u8 = 0;
            RecapGrpoResult r_h, r_d;
            CHECK(recap_fused_linear_grpo_loss(-1, NULL, &hhead, &hr, &rc, &lo, dh_a, dw_a, &r_h, NULL) == RECAP_OK);
            CHECK(recap_fused_linear_grpo_loss(0, NULL, &dhead, &dr, &rc, &lo, (void*)d_dh, (float*)d_dw, &r_d, NULL) ==
                  RECAP_OK);
            CHECK(close_to(r_d.loss, r_h.loss, 1e-3) && close_to(r_d.rollout_is_mean, r_h.rollout_is_mean, 1e-5) &&
                  r_h.rollout_is_mean != 1.0 && r_d.num_tokens == r_h.num_tokens && r_h.loss != rh2.loss);
            CHECK(cu_free(d_roll) == 0 && cu_free(d_wm) == 0);
        }
        dptr more[] = {d_h, d_w, d_dh, d_dw, d_ws, d_out2, d_cu2, d_lam2};
        for (size_t i = 0; i < sizeof more / sizeof more[0]; ++i) CHECK(cu_free(more[i]) == 0);
#undef H
    }

    /* a device error names its argument: a host array where the device path needs device memory is
     * not checked by the ABI (it cannot tell), but a bad size is, before any launch */
    CHECK(recap_kl(0, NULL, -1, (const float*)d_logp, (const float*)d_ref, NULL, 1, 3, (float*)d_kl, (float*)d_kg) ==
          RECAP_ERR_ARGUMENT);
    CHECK(strstr(recap_last_error(), "num_tokens") != NULL);

    dptr all[] = {d_logp, d_old, d_ref, d_adv, d_mask, d_grad, d_kl, d_kg, d_z, d_y, d_lp, d_ent, d_lse};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; ++i) CHECK(cu_free(all[i]) == 0);
    printf("ok\n");
    return 0;
}
