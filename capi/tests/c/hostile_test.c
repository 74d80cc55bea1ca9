/* Hostile inputs through the C ABI (host path, device = -1): each case runs in a forked child with a
 * timeout, so a crash or a hang is counted, not fatal. A malformed call must return an error status
 * whose message (recap_last_error) names the argument; poison at masked tokens must leave the
 * results bitwise unchanged. Prints the number of calls and "ok". */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include "recap_kernels.h"
#include "batch_util.h"

#define T 24
#define B 3
static const int32_t CU[B + 1] = {0, 10, 17, 24};
static float logp[T], old[T], ref[T], grad[T], pw[T];
static uint8_t mask[T];
static float adv[B] = {0.5f, -1.0f, 0.25f};
static float lambda1[1] = {1.0f};
static int32_t kinds1[1] = {0};

static void batch(void) {
    for (int t = 0; t < T; ++t) {
        old[t] = -1.0f - 0.05f * (float)(t % 7);
        logp[t] = old[t] + 0.02f * (float)(t % 5) - 0.04f;
        ref[t] = old[t] - 0.03f;
        pw[t] = 1.0f;
        mask[t] = (t % 6) != 4;
    }
}

static int loss_call(const RecapGrpoConfig* cfg, const int32_t* cu, int64_t t, int64_t b, int32_t k,
                     const uint32_t* membership, const float* policy_weight, RecapGrpoResult* r, double* stats) {
    RecapGrpoBatch x = test_batch(t, b, old, adv, mask, 1, cu, lambda1, kinds1);
    x.ref_logp = ref;
    x.policy_weight = policy_weight;
    x.membership = membership;
    x.num_objectives = k;
    return recap_grpo_loss(-1, NULL, logp, &x, cfg, grad, r, stats);
}

/* Case `i`: sets `arg` to the argument its error must name and, unless `dry`, makes the call in
 * this process and returns its status. Returns -1 past the last case. */
#define ARG(a)       \
    do {             \
        *arg = (a);  \
        if (dry) return 0; \
    } while (0)

static int run_case(int i, const char** arg, int dry) {
    RecapGrpoConfig cfg;
    recap_grpo_config_default(&cfg);
    cfg.kl_coef = 0.1f;
    RecapGrpoResult r;
    static double stats[256];
    if (!dry) batch();
    int32_t orient[2] = {0, 1};
    switch (i) {
    case 0: ARG("window"); return recap_scheduler_new(orient, 2, "{\"window\": 1099511627776}") ? 0 : 1;
    case 1: ARG("window"); return recap_scheduler_new(orient, 2, "{\"window\": 4611686018427387904}") ? 0 : 1;
    case 2: ARG("window"); return recap_scheduler_new(orient, 2, "{\"window\": -1}") ? 0 : 1;
    case 3: ARG("window"); return recap_scheduler_new(orient, 2, "{\"window\": 2.5}") ? 0 : 1;
    case 4: ARG("k"); return recap_scheduler_new(orient, -1, NULL) ? 0 : 1;
    case 5: ARG("dual_clip"); cfg.dual_clip = NAN; return loss_call(&cfg, CU, T, B, 1, NULL, NULL, &r, stats);
    case 6: ARG("delta"); cfg.delta = NAN; return loss_call(&cfg, CU, T, B, 1, NULL, NULL, &r, stats);
    case 7: ARG("clip_low"); cfg.clip_low = NAN; return loss_call(&cfg, CU, T, B, 1, NULL, NULL, &r, stats);
    case 8: ARG("norm_constant"); cfg.norm_constant = NAN; return loss_call(&cfg, CU, T, B, 1, NULL, NULL, &r, stats);
    case 9: ARG("kl_coef"); cfg.kl_coef = NAN; return loss_call(&cfg, CU, T, B, 1, NULL, NULL, &r, stats);
    case 10: /* stats overlapping result */
        ARG("stats");
        return loss_call(&cfg, CU, T, B, 1, NULL, NULL, &r, (double*)&r + 1);
    case 11: {
        ARG("seq_tokens");
        double n[16];
        RecapGrpoBatch x = test_batch(T, B, old, adv, mask, 1, CU, lambda1, kinds1);
        return recap_count_normalizers(-1, NULL, &x, n, n + 2);
    }
    case 12: {
        ARG("membership");
        double n[16], st[B];
        uint32_t mem[B] = {1, 4, 1};
        RecapGrpoBatch x = test_batch(T, B, old, adv, mask, 1, CU, lambda1, kinds1);
        x.membership = mem;
        x.num_objectives = 2;
        return recap_count_normalizers(-1, NULL, &x, n, st);
    }
    case 13: {
        ARG("membership");
        uint32_t mem[B] = {1, 2, 1};
        return loss_call(&cfg, CU, T, B, 1, mem, NULL, &r, stats);
    }
    case 14: ARG("num_tokens"); return loss_call(&cfg, CU, -1, B, 1, NULL, NULL, &r, stats);
    case 15: ARG("num_objectives"); return loss_call(&cfg, CU, T, B, 0, NULL, NULL, &r, stats);
    case 16: ARG("num_objectives"); return loss_call(&cfg, CU, T, B, -5, NULL, NULL, &r, stats);
    case 17: ARG("num_seqs"); return loss_call(&cfg, CU, T, -1, 1, NULL, NULL, &r, stats);
    case 18: {
        ARG("cu_seqlens");
        int32_t cu[B + 1] = {0, 17, 10, 24};
        return loss_call(&cfg, cu, T, B, 1, NULL, NULL, &r, stats);
    }
    case 19: {
        ARG("cu_seqlens");
        int32_t cu[B + 1] = {0, 10, 17, 23};
        return loss_call(&cfg, cu, T, B, 1, NULL, NULL, &r, stats);
    }
    case 20: ARG("policy_weight"); pw[5] = NAN; return loss_call(&cfg, CU, T, B, 1, NULL, pw, &r, stats);
    case 21: ARG("logp"); logp[7] = INFINITY; return loss_call(&cfg, CU, T, B, 1, NULL, NULL, &r, stats);
    case 22: ARG("old_logp"); old[7] = NAN; return loss_call(&cfg, CU, T, B, 1, NULL, NULL, &r, stats);
    case 23: ARG("ref_logp"); ref[7] = NAN; return loss_call(&cfg, CU, T, B, 1, NULL, NULL, &r, stats);
    case 24: ARG("cfg"); return loss_call(NULL, CU, T, B, 1, NULL, NULL, &r, stats);
    case 25: {
        ARG("lambda");
        float lam[1] = {NAN};
        RecapGrpoBatch x = test_batch(T, B, old, adv, mask, 1, CU, lam, kinds1);
        x.ref_logp = ref;
        return recap_grpo_loss(-1, NULL, logp, &x, &cfg, grad, &r, stats);
    }
    case 26: {
        ARG("objectives");
        int32_t k[1] = {5};
        RecapGrpoBatch x = test_batch(T, B, old, adv, mask, 1, CU, lambda1, k);
        x.ref_logp = ref;
        return recap_grpo_loss(-1, NULL, logp, &x, &cfg, grad, &r, stats);
    }
    case 27: {
        ARG("objective_loss");
        double tot[2];
        RecapGrpoBatch x = test_batch(T, B, old, adv, mask, 1, CU, lambda1, kinds1);
        return recap_weighted_reduce(-1, NULL, logp, &x, &cfg, grad, tot, tot);
    }
    case 28: ARG("num_tokens"); return recap_kl(-1, NULL, -3, logp, ref, mask, 1, 3, grad, pw);
    case 29: ARG("estimator"); return recap_kl(-1, NULL, T, logp, ref, mask, 1, 99, grad, pw);
    case 30: {
        ARG("logits.dtype");
        float z[4 * 5], lp[4], lse[4];
        int32_t y[4] = {0, 1, 2, 3};
        memset(z, 0, sizeof z);
        return recap_logprob_forward(-1, NULL, TEST_LOGITS(z, 7, 4, 5, 5, y, 1.0f), lp, NULL, lse, NULL);
    }
    case 31: {
        ARG("vocab");
        float z[4 * 5], lp[4], lse[4];
        int32_t y[4] = {0, 1, 2, 3};
        memset(z, 0, sizeof z);
        return recap_logprob_forward(-1, NULL, TEST_LOGITS(z, 0, 4, 0, 5, y, 1.0f), lp, NULL, lse, NULL);
    }
    case 32: {
        ARG("labels");
        float z[4 * 5], lp[4], lse[4];
        int32_t y[4] = {0, 1, 7, 3};
        memset(z, 0, sizeof z);
        return recap_logprob_forward(-1, NULL, TEST_LOGITS(z, 0, 4, 5, 5, y, 1.0f), lp, NULL, lse, NULL);
    }
    case 33: {
        ARG("temperature");
        float z[4 * 5], lp[4], lse[4];
        int32_t y[4] = {0, 1, 2, 3};
        memset(z, 0, sizeof z);
        return recap_logprob_forward(-1, NULL, TEST_LOGITS(z, 0, 4, 5, 5, y, NAN), lp, NULL, lse, NULL);
    }
    case 34: {
        ARG("group_size");
        float rw[6] = {1, 2, 3, 4, 5, 6}, out[6];
        int32_t modes[1] = {0};
        return recap_group_advantages(-1, NULL, rw, 6, 1, 0, NULL, 0, NULL, NULL, modes, 1e-6, 0, NULL, out);
    }
    case 35: {
        ARG("group_size");
        float rw[6] = {1, 2, 3, 4, 5, 6}, out[6];
        int32_t modes[1] = {0};
        return recap_group_advantages(-1, NULL, rw, 6, 1, -2, NULL, 0, NULL, NULL, modes, 1e-6, 0, NULL, out);
    }
    case 36: {
        ARG("num_rollouts");
        float rw[6] = {1, 2, 3, 4, 5, 6}, out[6];
        int32_t modes[1] = {0};
        return recap_group_advantages(-1, NULL, rw, -6, 1, 3, NULL, 0, NULL, NULL, modes, 1e-6, 0, NULL, out);
    }
    case 37: {
        ARG("modes");
        float rw[6] = {1, 2, 3, 4, 5, 6}, out[6];
        int32_t modes[1] = {99};
        return recap_group_advantages(-1, NULL, rw, 6, 1, 3, NULL, 0, NULL, NULL, modes, 1e-6, 0, NULL, out);
    }
    case 38: {
        ARG("grads.g_sum_pi_squared");
        float z[4 * 5], lp[4], lse[4], ent[4], spp[4], g[4] = {1, 1, 1, 1};
        int32_t y[4] = {0, 1, 2, 3};
        memset(z, 0, sizeof z);
        if (recap_logprob_forward(-1, NULL, TEST_LOGITS(z, 0, 4, 5, 5, y, 1.0f), lp, ent, lse, spp) != RECAP_OK) return -4;
        return recap_logprob_backward_inplace(-1, NULL, TEST_LOGITS(z, 0, 4, 5, 5, y, 1.0f),
                                              &(RecapLogprobGrads){lse, ent, g, NULL, spp, NULL});
    }
    default: return -1;
    }
}

/* The case in a child: its status, or -2 crashed, -3 hung; the message in msg. */
static int in_child(int i, char* msg, size_t cap) {
    int fd[2];
    if (pipe(fd) != 0) return -4;
    pid_t pid = fork();
    if (pid == 0) {
        close(fd[0]);
        const char* a = NULL;
        int rc = run_case(i, &a, 0);
        char out[1024];
        int n = snprintf(out, sizeof out, "%d\n%s", rc, recap_last_error());
        if (write(fd[1], out, (size_t)(n < (int)sizeof out ? n : (int)sizeof out - 1)) < 0) _exit(3);
        _exit(0);
    }
    close(fd[1]);
    int status = 0;
    for (int waited = 0;; ++waited) {
        pid_t w = waitpid(pid, &status, WNOHANG);
        if (w == pid) break;
        if (waited > 30000) { /* 30 s */
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            close(fd[0]);
            return -3;
        }
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    char buf[1024] = {0};
    ssize_t n = read(fd[0], buf, sizeof buf - 1);
    close(fd[0]);
    if (WIFSIGNALED(status) || WEXITSTATUS(status) != 0 || n <= 0) return -2;
    int rc = 0;
    sscanf(buf, "%d", &rc);
    const char* nl = strchr(buf, '\n');
    snprintf(msg, cap, "%s", nl ? nl + 1 : "");
    return rc;
}

int main(void) {
    int calls = 0, failures = 0;
    for (int i = 0;; ++i) {
        const char* arg = NULL;
        if (run_case(i, &arg, 1) == -1) break; /* past the last case */
        char msg[1024];
        int rc = in_child(i, msg, sizeof msg);
        ++calls;
        if (rc == -2 || rc == -3) {
            printf("FAILED case %d (%s): the child %s\n", i, arg, rc == -2 ? "crashed" : "hung");
            ++failures;
        } else if (rc == RECAP_OK) {
            printf("FAILED case %d (%s): accepted\n", i, arg);
            ++failures;
        } else if (strstr(msg, arg) == NULL) {
            printf("FAILED case %d: the message does not name `%s`: %s\n", i, arg, msg);
            ++failures;
        }
    }
    /* poison at masked tokens: the same loss, statistics and gradient, bit for bit */
    {
        RecapGrpoConfig cfg;
        recap_grpo_config_default(&cfg);
        cfg.kl_coef = 0.1f;
        RecapGrpoResult r0, r1;
        static double s0[256], s1[256];
        float g0[T];
        batch();
        if (loss_call(&cfg, CU, T, B, 1, NULL, NULL, &r0, s0) != RECAP_OK) {
            printf("FAILED: the clean call: %s\n", recap_last_error());
            return 1;
        }
        memcpy(g0, grad, sizeof g0);
        const float poison[3] = {NAN, INFINITY, -INFINITY};
        for (int p = 0; p < 3; ++p) {
            batch();
            for (int t = 0; t < T; ++t)
                if (!mask[t]) logp[t] = old[t] = ref[t] = poison[p];
            ++calls;
            if (loss_call(&cfg, CU, T, B, 1, NULL, NULL, &r1, s1) != RECAP_OK ||
                memcmp(&r0, &r1, sizeof r0) != 0 || memcmp(s0, s1, sizeof(double) * (size_t)recap_grpo_stats_len(1)) != 0 ||
                memcmp(g0, grad, sizeof g0) != 0) {
                printf("FAILED: poison %d at masked tokens changed a result (%s)\n", p, recap_last_error());
                ++failures;
            }
        }
    }
    printf("%d calls\n", calls);
    if (failures) return 1;
    printf("ok\n");
    return 0;
}
