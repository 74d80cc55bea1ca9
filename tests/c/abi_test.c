/* The C ABI from C: struct sizes, defaults, the scheduler, and errors that name the argument
 * (all before any device work). argv[1] = "1" when a CUDA driver is present (then the device
 * error path with dummy pointers is not exercised). Prints "ok" at the end; exit status 0. */
#include <stdio.h>
#include <string.h>
#include "recap_kernels.h"

#define CHECK(c) do { if (!(c)) { printf("FAILED line %d: %s (last error: %s)\n", __LINE__, #c, recap_last_error()); return 1; } } while (0)

int main(int argc, char** argv) {
    int has_driver = argc > 1 && argv[1][0] == '1';
    printf("sizes %zu %zu\n", sizeof(RecapGrpoConfig), sizeof(RecapGrpoResult));
    CHECK(strlen(recap_version()) > 0);

    RecapGrpoConfig cfg;
    CHECK(recap_grpo_config_default(&cfg) == RECAP_OK);
    CHECK(cfg.clip_low == 0.2f && cfg.dual_clip == 3.0f && cfg.kl_estimator == 3 && cfg.rollout_level == -1);
    CHECK(recap_grpo_config_default(NULL) == RECAP_ERR_ARGUMENT);
    CHECK(strstr(recap_last_error(), "cfg") != NULL);

    /* scheduler: weights 1 during warm-up, then they move and average 1; JSON round trip */
    int32_t orient[2] = {1, 0};
    RecapScheduler* s = recap_scheduler_new(orient, 2, 0, 0.0, -1.0);
    CHECK(s != NULL);
    float w[2];
    CHECK(recap_scheduler_weights(s, w, 2) == RECAP_OK && w[0] == 1.0f && w[1] == 1.0f);
    for (int i = 0; i < 25; ++i) {
        double v[2] = {0.1 + 0.02 * i, 2.0 - 0.001 * i};
        CHECK(recap_scheduler_observe(s, v, 2) == RECAP_OK);
    }
    CHECK(recap_scheduler_weights(s, w, 2) == RECAP_OK);
    CHECK(w[0] > 1.0f && w[1] < 1.0f && w[0] + w[1] > 1.999f && w[0] + w[1] < 2.001f);
    double bad[2] = {1.0, 0.0 / 0.0};
    CHECK(recap_scheduler_observe(s, bad, 2) == RECAP_ERR_ARGUMENT);
    CHECK(recap_scheduler_weights(s, w, 3) == RECAP_ERR_ARGUMENT && strstr(recap_last_error(), "k") != NULL);
    int64_t need = 0;
    char small[4];
    CHECK(recap_scheduler_to_json(s, small, 4, &need) == RECAP_ERR_ARGUMENT && need > 4);
    char buf[8192];
    CHECK(need < (int64_t)sizeof buf);
    CHECK(recap_scheduler_to_json(s, buf, sizeof buf, &need) == RECAP_OK && strlen(buf) + 1 == (size_t)need);
    RecapScheduler* r = recap_scheduler_from_json(buf);
    CHECK(r != NULL);
    float w2[2];
    CHECK(recap_scheduler_weights(r, w2, 2) == RECAP_OK && w2[0] == w[0] && w2[1] == w[1]);
    recap_scheduler_free(r);
    recap_scheduler_free(s);
    recap_scheduler_free(NULL);
    int32_t bad_orient[1] = {5};
    CHECK(recap_scheduler_new(bad_orient, 1, 0, 0.0, -1.0) == NULL);
    CHECK(strstr(recap_last_error(), "orientations") != NULL);
    CHECK(recap_scheduler_from_json("{not json") == NULL && strlen(recap_last_error()) > 0);

    /* argument errors name the argument, before any device work */
    float dummy[8] = {0};
    int32_t cu[3] = {0, 2, 4};
    float lambda[1] = {1.0f};
    int32_t kinds[1] = {0};
    RecapGrpoResult res;
    RecapGrpoConfig badcfg = cfg;
    badcfg.clip_low = 2.0f;
    CHECK(recap_grpo_loss(0, NULL, 4, dummy, dummy, NULL, NULL, dummy, 0, dummy, 0, cu, 2, lambda, kinds, NULL, 1,
                          &badcfg, dummy, &res, NULL) == RECAP_ERR_ARGUMENT);
    CHECK(strstr(recap_last_error(), "config.clip_low") != NULL);
    CHECK(recap_grpo_loss(0, NULL, 4, dummy, dummy, NULL, NULL, dummy, 0, dummy, 0, NULL, 2, lambda, kinds, NULL, 1,
                          &cfg, dummy, &res, NULL) == RECAP_ERR_ARGUMENT);
    CHECK(strstr(recap_last_error(), "cu_seqlens") != NULL);
    int32_t bad_kind[1] = {7};
    CHECK(recap_grpo_loss(0, NULL, 4, dummy, dummy, NULL, NULL, dummy, 0, dummy, 0, cu, 2, lambda, bad_kind, NULL, 1,
                          &cfg, dummy, &res, NULL) == RECAP_ERR_ARGUMENT);
    CHECK(strstr(recap_last_error(), "objectives") != NULL);
    /* an empty batch is defined without a device */
    int32_t cu0[2] = {0, 0};
    double obj[1] = {-1.0};
    CHECK(recap_grpo_loss(0, NULL, 0, NULL, NULL, NULL, NULL, dummy, 0, NULL, 0, cu0, 1, lambda, kinds, NULL, 1, &cfg,
                          NULL, &res, obj) == RECAP_OK);
    CHECK(res.loss == 0.0 && res.num_tokens == 0.0 && obj[0] == 0.0);
    int32_t labels[2] = {0, 1};
    CHECK(recap_logprob_forward(0, NULL, dummy, 0, 2, 4, 4, labels, 0.0f, -100, dummy, NULL, dummy) ==
          RECAP_ERR_ARGUMENT);
    CHECK(strstr(recap_last_error(), "temperature") != NULL);
    CHECK(recap_logprob_forward(0, NULL, dummy, 9, 2, 4, 4, labels, 1.0f, -100, dummy, NULL, dummy) != RECAP_OK);
    int32_t modes[1] = {7};
    CHECK(recap_group_advantages(0, NULL, dummy, 4, 1, 2, NULL, 0, modes, 1e-6, dummy) == RECAP_ERR_ARGUMENT);
    CHECK(strstr(recap_last_error(), "modes") != NULL);
    CHECK(recap_kl(0, NULL, 4, dummy, dummy, NULL, 0, 9, dummy, dummy) == RECAP_ERR_ARGUMENT);
    CHECK(strstr(recap_last_error(), "estimator") != NULL);
    CHECK(recap_weighted_reduce(0, NULL, 4, dummy, dummy, 0, cu, 2, lambda, NULL, 1, &cfg, dummy, NULL, NULL) ==
          RECAP_ERR_ARGUMENT);
    CHECK(strstr(recap_last_error(), "total") != NULL);
    uint8_t m8[4] = {1, 1, 1, 1};
    CHECK(recap_fused_linear_grpo_loss(0, NULL, 4, 2, 4, dummy, dummy, labels, dummy, NULL, dummy, 0, m8, cu, 2, lambda,
                                       kinds, NULL, 1, &cfg, 0.0f, 0, 0, 0, dummy, dummy, &res, NULL) ==
          RECAP_ERR_ARGUMENT);
    CHECK(strstr(recap_last_error(), "temperature") != NULL);
    double total = -1.0;
    CHECK(recap_weighted_reduce(0, NULL, 0, NULL, NULL, 0, cu0, 1, lambda, NULL, 1, &cfg, NULL, &total, NULL) ==
          RECAP_OK && total == 0.0);
    if (!has_driver) {
        /* valid arguments, no GPU: a device error that says why */
        CHECK(recap_grpo_loss(0, NULL, 4, dummy, dummy, NULL, NULL, dummy, 0, dummy, 0, cu, 2, lambda, kinds, NULL, 1,
                              &cfg, dummy, &res, NULL) == RECAP_ERR_DEVICE);
        CHECK(strlen(recap_last_error()) > 0);
    }
    printf("ok\n");
    return 0;
}
