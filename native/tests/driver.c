/*
 * Test driver: COUNT pam_start/pam_authenticate/pam_end transactions against SERVICE, answering each
 * prompt from a script, so valgrind sees many logins (good and hostile) in one process.
 *
 *   driver [-s] [-n COUNT] [-x EXPECTED] SERVICE USER [ANSWER...]
 *
 * -s sets PAM_SILENT. Prompts take the answers in order (from the first again in each transaction);
 * a prompt past the last answer fails the conversation. Prints "code <n>: <count>" per result code;
 * with -x exits 0 only when every transaction returned EXPECTED.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <security/pam_appl.h>

struct script {
    char **answers;
    int count;
    int next;
};

static int scripted_conv(int n, const struct pam_message **msg, struct pam_response **resp, void *data)
{
    struct script *s = data;
    if (n <= 0 || n > PAM_MAX_NUM_MSG)
        return PAM_CONV_ERR;
    struct pam_response *r = calloc((size_t)n, sizeof *r);
    if (r == NULL)
        return PAM_BUF_ERR;
    for (int i = 0; i < n; i++) {
        int style = msg[i]->msg_style;
        if (style != PAM_PROMPT_ECHO_OFF && style != PAM_PROMPT_ECHO_ON)
            continue;
        if (s->next >= s->count || (r[i].resp = strdup(s->answers[s->next++])) == NULL) {
            for (int j = 0; j < i; j++)
                free(r[j].resp);
            free(r);
            return PAM_CONV_ERR;
        }
    }
    *resp = r;
    return PAM_SUCCESS;
}

int main(int argc, char **argv)
{
    int flags = 0, count = 1, expected = -1, opt;
    int tally[64] = {0};

    while ((opt = getopt(argc, argv, "sn:x:")) != -1) {
        switch (opt) {
        case 's': flags |= (int)PAM_SILENT; break;
        case 'n': count = atoi(optarg); break;
        case 'x': expected = atoi(optarg); break;
        default: return 2;
        }
    }
    if (argc - optind < 2 || count < 1) {
        fprintf(stderr, "usage: driver [-s] [-n COUNT] [-x EXPECTED] SERVICE USER [ANSWER...]\n");
        return 2;
    }
    struct script s = {.answers = argv + optind + 2, .count = argc - optind - 2};
    int all_expected = 1;
    for (int i = 0; i < count; i++) {
        pam_handle_t *pamh = NULL;
        struct pam_conv conv = {scripted_conv, &s};
        s.next = 0;
        int rc = pam_start(argv[optind], argv[optind + 1], &conv, &pamh);
        if (rc == PAM_SUCCESS)
            rc = pam_authenticate(pamh, flags);
        int end = pam_end(pamh, rc);
        if (end != PAM_SUCCESS)
            fprintf(stderr, "pam_end: %d\n", end);
        if (rc >= 0 && rc < 64)
            tally[rc]++;
        if (rc != expected)
            all_expected = 0;
    }
    for (int c = 0; c < 64; c++)
        if (tally[c] > 0)
            printf("code %d: %d\n", c, tally[c]);
    return expected < 0 || all_expected ? 0 : 1;
}
