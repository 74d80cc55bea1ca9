/* The C ABI from C: defaults, the scheduler, and errors that name the argument
 * (all before any device work). argv[1] = "1" when a CUDA driver is present (then the device
 * error path with dummy pointers is not exercised). Prints "ok" at the end; exit status 0. */
#include <math.h>
#include <stdio.h>
#include <string.h>
#include "recap_kernels.h"
#include "batch_util.h"

#define CHECK(c) do { if (!(c)) { printf("FAILED line %d: %s (last error: %s)\n", __LINE__, #c, recap_last_error()); return 1; } } while (0)

/* The same entry points on host memory (device -1, the CPU reference), against hand-computed
 * values: with logp = old_logp every ratio is 1, so under token-mean the loss is -mean(A) over the
 * tokens and dL/dlogp = -A / T. */
static int host_checks(const RecapGrpoConfig* cfg) {
    float logp[4] = {-1.0f, -2.0f, -0.5f, -1.5f};
    float adv[2] = {0.5f, -1.0f};
    uint8_t mask[4] = {1, 1, 1, 1};
    int32_t cu[3] = {0, 2, 4};
    float lambda[1] = {1.0f};
    int32_t kinds[1] = {0};
    float grad[4];
    double stats[32];
    RecapGrpoResult res;
    RecapGrpoBatch b = test_batch(4, 2, logp, adv, mask, 1, cu, lambda, kinds);
    CHECK(recap_grpo_loss(-1, NULL, logp, &b, cfg, grad, &res, stats) == RECAP_OK);
    CHECK(res.loss > 0.2499 && res.loss < 0.2501 && res.num_tokens == 4.0 && res.ratio_mean == 1.0);
    CHECK(grad[0] == -0.125f && grad[1] == -0.125f && grad[2] == 0.25f && grad[3] == 0.25f);
    /* GMPO (8) at ratio 1: the sequence ratio is exp(mean min(0, eh)) = 1, the same loss and gradient */
    RecapGrpoConfig gmpo = *cfg;
    gmpo.policy_loss = 8;
    CHECK(recap_grpo_loss(-1, NULL, logp, &b, &gmpo, grad, &res, NULL) == RECAP_OK);
    CHECK(res.loss > 0.2499 && res.loss < 0.2501 && grad[0] == -0.125f && grad[3] == 0.25f);
    /* DRO (7) needs a positive beta; 9 is no policy loss */
    gmpo.policy_loss = 7;
    gmpo.dro_beta = 0.0f;
    CHECK(recap_grpo_loss(-1, NULL, logp, &b, &gmpo, grad, &res, NULL) == RECAP_ERR_ARGUMENT);
    CHECK(strstr(recap_last_error(), "beta") != NULL);
    gmpo.policy_loss = 9;
    CHECK(recap_grpo_loss(-1, NULL, logp, &b, &gmpo, grad, &res, NULL) == RECAP_ERR_ARGUMENT);
    CHECK(strstr(recap_last_error(), "policy_loss") != NULL);
    /* per-term aggregation: seq-mean-token-mean (1) for the policy term; 7 is no mode */
    gmpo = *cfg;
    gmpo.policy_agg_mode = 1;
    CHECK(recap_grpo_loss(-1, NULL, logp, &b, &gmpo, grad, &res, NULL) == RECAP_OK);
    gmpo.policy_agg_mode = 7;
    CHECK(recap_grpo_loss(-1, NULL, logp, &b, &gmpo, grad, &res, NULL) == RECAP_ERR_ARGUMENT);
    CHECK(strstr(recap_last_error(), "policy_agg_mode") != NULL);
    /* the fields of stats: names, offsets and lengths */
    int found = 0;
    for (int32_t i = 0; recap_grpo_stat_field(1, i, NULL, NULL, NULL) == RECAP_OK; ++i) {
        const char* name;
        int64_t off, len;
        CHECK(recap_grpo_stat_field(1, i, &name, &off, &len) == RECAP_OK && len == 1);
        CHECK(off + len <= recap_grpo_stats_len(1));
        if (strcmp(name, "actor/pg_loss") == 0) { CHECK(stats[off] > 0.2499 && stats[off] < 0.2501); ++found; }
        if (strcmp(name, "actor/pg_clipfrac") == 0) { CHECK(stats[off] == 0.0); ++found; }
        if (strcmp(name, "actor/num_tokens") == 0) { CHECK(stats[off] == 4.0); ++found; }
    }
    CHECK(found == 3 && strstr(recap_last_error(), "index") != NULL);
    /* global normalizers of twice the tokens halve the loss and the gradient */
    double norms[4];
    CHECK(recap_count_normalizers(-1, NULL, &b, norms, NULL) == RECAP_OK);
    CHECK(norms[0] == 4.0 && norms[1] == 4.0 && norms[2] == 2.0 && norms[3] == 2.0);
    for (int i = 0; i < 4; ++i) norms[i] *= 2.0;
    b.normalizers = norms;
    CHECK(recap_grpo_loss(-1, NULL, logp, &b, cfg, grad, &res, NULL) == RECAP_OK);
    CHECK(res.loss > 0.12499 && res.loss < 0.12501 && grad[0] == -0.0625f);
    b.normalizers = NULL;
    /* an output overlapping an input is refused */
    CHECK(recap_grpo_loss(-1, NULL, logp, &b, cfg, logp, &res, NULL) == RECAP_ERR_ARGUMENT);
    CHECK(strstr(recap_last_error(), "grad") != NULL);
    /* log-probabilities of a uniform row: -log V, entropy log V, sum of squared probabilities 1/V */
    float logits[8] = {0};
    int32_t labels[2] = {1, 3};
    float lp[2], ent[2], lse[2], spp[2];
    CHECK(recap_logprob_forward(-1, NULL, TEST_LOGITS(logits, 0, 2, 4, 4, labels, 1.0f), lp, ent, lse, spp) == RECAP_OK);
    CHECK(lp[0] > -1.3863f && lp[0] < -1.3862f && ent[1] > 1.3862f && ent[1] < 1.3863f);
    CHECK(spp[0] > 0.24999f && spp[0] < 0.25001f && spp[1] > 0.24999f && spp[1] < 0.25001f);
    /* KL k1 is the log-ratio */
    float ref[4] = {-1.5f, -2.0f, -0.5f, -1.0f}, kl[4], kg[4];
    CHECK(recap_kl(-1, NULL, 4, logp, ref, NULL, 0, 0, kl, kg) == RECAP_OK);
    CHECK(kl[0] == 0.5f && kl[3] == -0.5f && kg[0] == 1.0f);
    /* rollout rejection: token k2 = lr^2 / 2 at most 0.1 rejects lr = 1; seq sum k1 (-lr in
     * [log 0.5, log 2]) rejects the second sequence, whose -lr sum is -1.4 */
    float lr[4] = {0.1f, -0.2f, 1.0f, 0.4f};
    int32_t rs[4];
    CHECK(recap_rollout_rejection(-1, NULL, 4, lr, mask, 1, cu, 2, "token_k2,seq_sum_k1", "0.1,0.5_2", 0.0, rs) == RECAP_OK);
    CHECK(rs[0] == 0 && rs[1] == 0 && rs[2] == 3 && rs[3] == 2);
    CHECK(recap_rollout_rejection(-1, NULL, 4, lr, mask, 1, cu, 2, "token_k9", "0.1", 0.0, rs) == RECAP_ERR_ARGUMENT);
    CHECK(strstr(recap_last_error(), "rollout_rs") != NULL);
    /* the older verl API's veto alone: ratio exp(-0.2) < 0.85 rejects the first sequence whole */
    CHECK(recap_rollout_rejection(-1, NULL, 4, lr, mask, 1, cu, 2, "", "", 0.85, rs) == RECAP_OK);
    CHECK(rs[0] == 1 && rs[1] == 1 && rs[2] == 0 && rs[3] == 0);
    CHECK(recap_rollout_rejection(-1, NULL, 4, lr, mask, 1, cu, 2, "", "", -1.0, rs) == RECAP_ERR_ARGUMENT);
    CHECK(strstr(recap_last_error(), "rollout_token_veto_threshold") != NULL);
    /* rollout IS weights, token level truncated at 2: exp(lr), e^1 capped; normalized by their mean
     * (1.10517 + 0.81873 + 2 + 1.49182) / 4 = 1.35393 */
    float isw[4];
    double ist[7];
    CHECK(recap_rollout_is_weights(-1, NULL, 4, lr, mask, 1, cu, 2, "token", "2", 0, isw, ist) == RECAP_OK);
    CHECK(isw[0] > 1.10517f && isw[0] < 1.10518f && isw[2] == 2.0f && ist[1] == 4.0 && ist[4] == 1.0);
    CHECK(ist[3] > 2.71828 && ist[3] < 2.71829 && ist[6] == 1.0);
    CHECK(recap_rollout_is_weights(-1, NULL, 4, lr, mask, 1, cu, 2, "token", "2", 1, isw, ist) == RECAP_OK);
    CHECK(ist[6] > 1.35392 && ist[6] < 1.35394 && isw[2] > 1.47717f && isw[2] < 1.47719f);
    /* sequence level, IcePop band [0.5, 2]: exp(-0.1) kept, exp(1.4) set to 0 */
    CHECK(recap_rollout_is_weights(-1, NULL, 4, lr, mask, 1, cu, 2, "sequence", "0.5_2", 0, isw, NULL) == RECAP_OK);
    CHECK(isw[0] > 0.90483f && isw[0] < 0.90484f && isw[1] == isw[0] && isw[2] == 0.0f && isw[3] == 0.0f);
    CHECK(recap_rollout_is_weights(-1, NULL, 4, lr, mask, 1, cu, 2, "tokens", "2", 0, isw, NULL) == RECAP_ERR_ARGUMENT);
    CHECK(strstr(recap_last_error(), "rollout_is") != NULL);
    CHECK(recap_rollout_is_weights(-1, NULL, 4, lr, mask, 1, cu, 2, "token", "2_0.5", 0, isw, NULL) == RECAP_ERR_ARGUMENT);
    CHECK(strstr(recap_last_error(), "rollout_is_threshold") != NULL);
    /* Dr. GRPO advantages: reward minus the group mean */
    float rewards[4] = {1.0f, 0.0f, 2.0f, 4.0f}, out[4];
    int32_t modes[1] = {1};
    CHECK(recap_group_advantages(-1, NULL, rewards, 4, 1, 2, NULL, 0, NULL, NULL, modes, 1e-6, 0, NULL, out) == RECAP_OK);
    CHECK(out[0] == 0.5f && out[1] == -0.5f && out[2] == -1.0f && out[3] == 1.0f);
    /* OPO: the length-weighted baseline, (1 * 1 + 3 * 0) / 4 and (1 * 2 + 1 * 4) / 2 */
    int32_t lengths[4] = {1, 3, 1, 1}, opo[1] = {6};
    CHECK(recap_group_advantages(-1, NULL, rewards, 4, 1, 2, NULL, 0, lengths, NULL, opo, 1e-6, 0, NULL, out) == RECAP_OK);
    CHECK(out[0] == 0.75f && out[1] == -0.25f && out[2] == -1.0f && out[3] == 1.0f);
    CHECK(recap_group_advantages(-1, NULL, rewards, 4, 1, 2, NULL, 0, NULL, NULL, opo, 1e-6, 0, NULL, out) == RECAP_ERR_ARGUMENT);
    CHECK(strstr(recap_last_error(), "lengths") != NULL);
    /* a group of one: 0, or verl's convention (Dr. GRPO: the reward) */
    int32_t lone[4] = {0, 1, 1, 1};
    CHECK(recap_group_advantages(-1, NULL, rewards, 4, 1, 0, lone, 2, NULL, NULL, modes, 1e-6, 0, NULL, out) == RECAP_OK);
    CHECK(out[0] == 0.0f);
    CHECK(recap_group_advantages(-1, NULL, rewards, 4, 1, 0, lone, 2, NULL, NULL, modes, 1e-6, 1, NULL, out) == RECAP_OK);
    CHECK(out[0] == 1.0f);
    /* reward weights: Dr. GRPO of 1 * r0 + 2 * r1 over rewards [B = 2, K = 2] in one group:
     * values 1 + 0 = 1 and 2 + 8 = 10 (rewards read as [[1, 0], [2, 4]]), mean 5.5 */
    double w[2] = {1.0, 2.0};
    CHECK(recap_group_advantages(-1, NULL, rewards, 2, 2, 2, NULL, 0, NULL, NULL, modes, 1e-6, 0, w, out) == RECAP_OK);
    CHECK(out[0] == -4.5f && out[1] == 4.5f);
    /* ReMax (11): r - b whatever the groups; without baselines an error naming them */
    float base[4] = {0.5f, 0.5f, 3.0f, 1.0f};
    int32_t remax[1] = {11};
    CHECK(recap_group_advantages(-1, NULL, rewards, 4, 1, 2, NULL, 0, NULL, base, remax, 1e-6, 0, NULL, out) == RECAP_OK);
    CHECK(out[0] == 0.5f && out[1] == -0.5f && out[2] == -1.0f && out[3] == 3.0f);
    CHECK(recap_group_advantages(-1, NULL, rewards, 4, 1, 2, NULL, 0, NULL, NULL, remax, 1e-6, 0, NULL, out) == RECAP_ERR_ARGUMENT);
    CHECK(strstr(recap_last_error(), "baselines") != NULL);
    /* the optimal token baseline of one group of two: with old_logp 0 and sum_pi_squared 2 every
     * w is 1, so W = [1, 2] in both; G = [1, 1] and [3, 3]; B = (1 + 3) / 2 and (2 + 6) / 4 = 2 */
    float tr[4] = {0.0f, 1.0f, 0.0f, 3.0f}, zero[4] = {0.0f, 0.0f, 0.0f, 0.0f}, two[4] = {2.0f, 2.0f, 2.0f, 2.0f};
    float otb[4], ret[4];
    CHECK(recap_optimal_token_baseline(-1, NULL, 4, tr, zero, two, NULL, mask, 1, cu, 2, 2, NULL, 0, 0, 0.0, otb,
                                       ret) == RECAP_OK);
    CHECK(otb[0] == -1.0f && otb[1] == -1.0f && otb[2] == 1.0f && otb[3] == 1.0f);
    CHECK(ret[0] == 1.0f && ret[1] == 1.0f && ret[2] == 3.0f && ret[3] == 3.0f);
    /* host group ids: two groups of one get no baseline (A = G) */
    int32_t apart[2] = {40, -7};
    CHECK(recap_optimal_token_baseline(-1, NULL, 4, tr, zero, two, NULL, mask, 1, cu, 2, 0, apart, 0, 1, 1e-8, otb,
                                       ret) == RECAP_OK);
    CHECK(otb[0] == 1.0f && otb[1] == 1.0f && otb[2] == 3.0f && otb[3] == 3.0f);
    CHECK(recap_optimal_token_baseline(-1, NULL, 4, tr, zero, two, NULL, mask, 1, cu, 2, 3, NULL, 0, 0, 0.0, otb,
                                       ret) == RECAP_ERR_ARGUMENT);
    CHECK(strstr(recap_last_error(), "groups") != NULL);
    CHECK(recap_optimal_token_baseline(-1, NULL, 4, tr, zero, NULL, NULL, mask, 1, cu, 2, 2, NULL, 0, 0, 0.0, otb,
                                       ret) == RECAP_ERR_ARGUMENT);
    CHECK(strstr(recap_last_error(), "sum_pi_squared") != NULL);
    /* GAE with gamma 0: A = r - v = 1, 2, 3 (two sequences); whitened: mean 2, unbiased var 1 */
    float gr[3] = {1.0f, 2.0f, 3.0f}, gv[3] = {0.0f, 0.0f, 0.0f}, ga[3], gret[3];
    uint8_t gm[3] = {1, 1, 1};
    int32_t gcu[3] = {0, 1, 3};
    RecapGaeOptions gopt = {/* gamma */ 0.0, /* lam */ 1.0, /* whiten */ 0};
    CHECK(recap_gae(-1, NULL, 3, gr, gv, gm, 1, gcu, 2, &gopt, ga, gret) == RECAP_OK);
    CHECK(ga[0] == 1.0f && ga[1] == 2.0f && ga[2] == 3.0f && gret[2] == 3.0f);
    gopt.whiten = 1;
    CHECK(recap_gae(-1, NULL, 3, gr, gv, gm, 1, gcu, 2, &gopt, ga, gret) == RECAP_OK);
    CHECK(fabsf(ga[0] + 1.0f) < 1e-6f && fabsf(ga[1]) < 1e-6f && fabsf(ga[2] - 1.0f) < 1e-6f);
    /* verl's defaults (NULL): gamma = lam = 1, so every token of a sequence gets its reward to go */
    CHECK(recap_gae(-1, NULL, 3, gr, gv, gm, 1, gcu, 2, NULL, ga, gret) == RECAP_OK);
    CHECK(gret[0] == 1.0f && gret[1] == 5.0f && gret[2] == 3.0f);
    gr[1] = NAN;
    CHECK(recap_gae(-1, NULL, 3, gr, gv, gm, 1, gcu, 2, NULL, ga, gret) == RECAP_ERR_ARGUMENT);
    CHECK(strstr(recap_last_error(), "token_rewards") != NULL && strstr(recap_last_error(), "token 1") != NULL);
    gr[1] = 2.0f;
    CHECK(recap_gae(-1, NULL, 3, gr, gv, gm, 1, gcu, 2, NULL, ga, gret) == RECAP_OK);
    return 0;
}

int main(int argc, char** argv) {
    int has_driver = argc > 1 && argv[1][0] == '1';
    CHECK(strlen(recap_version()) > 0);

    RecapGrpoConfig cfg;
    CHECK(recap_grpo_config_default(&cfg) == RECAP_OK);
    CHECK(cfg.clip_low == 0.2f && cfg.dual_clip == 3.0f && cfg.kl_estimator == 3 && cfg.rollout_level == -1);
    CHECK(recap_grpo_config_default(NULL) == RECAP_ERR_ARGUMENT);
    CHECK(strstr(recap_last_error(), "cfg") != NULL);

    /* scheduler: weights 1 during warm-up, then they move and average 1; JSON round trip */
    int32_t orient[2] = {1, 0};
    RecapScheduler* s = recap_scheduler_new(orient, 2, NULL);
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
    CHECK(recap_scheduler_new(bad_orient, 1, NULL) == NULL);
    CHECK(strstr(recap_last_error(), "orientations") != NULL);
    CHECK(recap_scheduler_new(orient, 2, "{\"windw\": 3}") == NULL && strstr(recap_last_error(), "windw") != NULL);
    RecapScheduler* a = recap_scheduler_new(orient, 2, "{\"window\": 2, \"priority\": \"softmax_mixture\"}");
    CHECK(a != NULL);
    recap_scheduler_free(a);
    CHECK(recap_scheduler_from_json("{not json") == NULL && strlen(recap_last_error()) > 0);

    /* argument errors name the argument, before any device work */
    float dummy[8] = {0};
    int32_t cu[3] = {0, 2, 4};
    float lambda[1] = {1.0f};
    int32_t kinds[1] = {0};
    RecapGrpoResult res;
    RecapGrpoConfig badcfg = cfg;
    badcfg.clip_low = 2.0f;
    RecapGrpoBatch b = test_batch(4, 2, dummy, dummy, dummy, 0, cu, lambda, kinds);
    CHECK(recap_grpo_loss(0, NULL, dummy, &b, &badcfg, dummy, &res, NULL) == RECAP_ERR_ARGUMENT);
    CHECK(strstr(recap_last_error(), "config.clip_low") != NULL);
    CHECK(recap_grpo_loss(0, NULL, dummy, NULL, &cfg, dummy, &res, NULL) == RECAP_ERR_ARGUMENT);
    CHECK(strstr(recap_last_error(), "batch") != NULL);
    RecapGrpoBatch badb = b;
    badb.cu_seqlens = NULL;
    CHECK(recap_grpo_loss(0, NULL, dummy, &badb, &cfg, dummy, &res, NULL) == RECAP_ERR_ARGUMENT);
    CHECK(strstr(recap_last_error(), "cu_seqlens") != NULL);
    int32_t bad_kind[1] = {7};
    badb = b;
    badb.objectives = bad_kind;
    CHECK(recap_grpo_loss(0, NULL, dummy, &badb, &cfg, dummy, &res, NULL) == RECAP_ERR_ARGUMENT);
    CHECK(strstr(recap_last_error(), "objectives") != NULL);
    /* the synchronous call takes its layout from the host */
    badb = b;
    badb.layout_on_device = 1;
    CHECK(recap_grpo_loss(0, NULL, dummy, &badb, &cfg, dummy, &res, NULL) == RECAP_ERR_ARGUMENT);
    CHECK(strstr(recap_last_error(), "batch.layout_on_device") != NULL);
    /* an empty batch is defined without a device */
    int32_t cu0[2] = {0, 0};
    double obj[32];
    obj[0] = -1.0;
    CHECK(recap_grpo_stats_len(1) > 5 && recap_grpo_stats_len(1) < 32 && recap_grpo_stats_len(-1) < 0);
    RecapGrpoBatch empty = test_batch(0, 1, NULL, dummy, NULL, 0, cu0, lambda, kinds);
    CHECK(recap_grpo_loss(0, NULL, NULL, &empty, &cfg, NULL, &res, obj) == RECAP_OK);
    CHECK(res.loss == 0.0 && res.num_tokens == 0.0 && obj[0] == 0.0);
    int32_t labels[2] = {0, 1};
    CHECK(recap_logprob_forward(0, NULL, TEST_LOGITS(dummy, 0, 2, 4, 4, labels, 0.0f), dummy, NULL, dummy, NULL) ==
          RECAP_ERR_ARGUMENT);
    CHECK(strstr(recap_last_error(), "temperature") != NULL);
    CHECK(recap_logprob_forward(0, NULL, TEST_LOGITS(dummy, 9, 2, 4, 4, labels, 1.0f), dummy, NULL, dummy, NULL) != RECAP_OK);
    int32_t modes[1] = {99};
    CHECK(recap_group_advantages(0, NULL, dummy, 4, 1, 2, NULL, 0, NULL, NULL, modes, 1e-6, 0, NULL, dummy) ==
          RECAP_ERR_ARGUMENT);
    CHECK(strstr(recap_last_error(), "modes") != NULL);
    modes[0] = 0;
    CHECK(recap_group_advantages(0, NULL, dummy, 4, 1, 2, NULL, 0, NULL, NULL, modes, 1e-6, 2, NULL, dummy) ==
          RECAP_ERR_ARGUMENT);
    CHECK(strstr(recap_last_error(), "singletons") != NULL);
    CHECK(recap_kl(0, NULL, 4, dummy, dummy, NULL, 0, 9, dummy, dummy) == RECAP_ERR_ARGUMENT);
    CHECK(strstr(recap_last_error(), "estimator") != NULL);
    CHECK(recap_weighted_reduce(0, NULL, dummy, &b, &cfg, dummy, NULL, NULL) == RECAP_ERR_ARGUMENT);
    CHECK(strstr(recap_last_error(), "total") != NULL);
    uint8_t m8[4] = {1, 1, 1, 1};
    RecapGrpoBatch lb = test_batch(4, 2, dummy, dummy, m8, 1, cu, lambda, kinds);
    RecapLinearHead head = {2, 4, dummy, dummy, labels};
    RecapFusedLinearOptions lo;
    CHECK(recap_fused_linear_options_default(&lo) == RECAP_OK && lo.temperature == 1.0f && lo.ignore_index == -100 &&
          lo.batch_invariant == 0);
    lo.temperature = 0.0f;
    CHECK(recap_fused_linear_grpo_loss(0, NULL, &head, &lb, &cfg, &lo, dummy, dummy, &res, NULL) == RECAP_ERR_ARGUMENT);
    CHECK(strstr(recap_last_error(), "temperature") != NULL);
    CHECK(recap_fused_linear_workspace_len(4, 2, 1, 4, &lo) == -1);
    lo.temperature = 1.0f;
    lb.policy_weight = dummy;
    CHECK(recap_fused_linear_grpo_loss(0, NULL, &head, &lb, &cfg, &lo, dummy, dummy, &res, NULL) == RECAP_ERR_ARGUMENT);
    CHECK(strstr(recap_last_error(), "batch.policy_weight") != NULL);
    lb.policy_weight = NULL;
    head.vocab = 0;
    CHECK(recap_fused_linear_grpo_loss(0, NULL, &head, &lb, &cfg, &lo, dummy, dummy, &res, NULL) == RECAP_ERR_ARGUMENT);
    CHECK(strstr(recap_last_error(), "head.vocab") != NULL);
    CHECK(recap_fused_linear_grpo_loss(0, NULL, NULL, &lb, &cfg, &lo, dummy, dummy, &res, NULL) == RECAP_ERR_ARGUMENT);
    CHECK(strstr(recap_last_error(), "head") != NULL);
    double total = -1.0;
    CHECK(recap_weighted_reduce(0, NULL, NULL, &empty, &cfg, NULL, &total, NULL) == RECAP_OK && total == 0.0);
    if (!has_driver) {
        /* valid arguments, no GPU: a device error that says why */
        CHECK(recap_grpo_loss(0, NULL, dummy, &b, &cfg, dummy, &res, NULL) == RECAP_ERR_DEVICE);
        CHECK(strlen(recap_last_error()) > 0);
    }
    if (host_checks(&cfg) != 0) return 1;
    printf("ok\n");
    return 0;
}
