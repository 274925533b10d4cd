/*
 * Test driver: pam_start/pam_authenticate/pam_end transactions with a scripted conversation, for
 * several cases in one process, so valgrind sees many logins (good and hostile) for the price of one
 * start-up (issue 19 item 10: a valgrind process per case was most of the test's time).
 *
 *   driver CASE [-- CASE ...]
 *   CASE: [-s] [-n COUNT] [-x EXPECTED] SERVICE USER [ANSWER...]
 *
 * Each case runs COUNT transactions against SERVICE. -s sets PAM_SILENT. Prompts take the answers in
 * order (from the first again in each transaction); a prompt past the last answer fails the
 * conversation. For each case it prints "case <k>: <service>", then "code <n>: <count>" per result
 * code, then the descriptors open after the case's first and after its last transaction
 * ("fds first: 0 1 2" / "fds last: ..."), so a descriptor left open per login shows as a difference.
 * With -x it exits 1 unless every transaction of that case returned EXPECTED.
 */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include <security/pam_appl.h>

#define MAX_FDS 256

struct script {
    char **answers;
    int count;
    int next;
};

struct fd_set_list {
    int fds[MAX_FDS];
    int n;
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

/*
 * The descriptors this process has open, from /proc/self/fd, in the order listed. Under valgrind
 * only those below the client's RLIMIT_NOFILE: valgrind keeps its own descriptors above it.
 */
static void open_fds(struct fd_set_list *out)
{
    struct rlimit lim;
    long below = getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur != RLIM_INFINITY ? (long)lim.rlim_cur
                                                                                       : 1L << 20;
    out->n = 0;
    DIR *dir = opendir("/proc/self/fd");
    if (dir == NULL) {
        out->fds[out->n++] = -1; /* shows as a difference if it happens only once */
        return;
    }
    int own = dirfd(dir);
    struct dirent *entry;
    while ((entry = readdir(dir)) != NULL && out->n < MAX_FDS) {
        char *end;
        long fd = strtol(entry->d_name, &end, 10);
        if (end == entry->d_name || *end != '\0' || fd == own || fd >= below)
            continue;
        out->fds[out->n++] = (int)fd;
    }
    closedir(dir);
}

static void print_fds(const char *label, const struct fd_set_list *fds)
{
    printf("fds %s:", label);
    for (int i = 0; i < fds->n; i++)
        printf(" %d", fds->fds[i]);
    printf("\n");
}

static int is_flag(const char *arg, const char *flag)
{
    return strcmp(arg, flag) == 0;
}

/* One case from argv[*at]; returns 0, 1 (-x not met) or 2 (usage). Leaves *at after its "--". */
static int run_case(int argc, char **argv, int *at, int number)
{
    int flags = 0, count = 1, expected = -1, i = *at;
    int tally[64] = {0};

    for (; i < argc && argv[i][0] == '-' && !is_flag(argv[i], "--"); i++) {
        if (is_flag(argv[i], "-s"))
            flags |= (int)PAM_SILENT;
        else if (is_flag(argv[i], "-n") && i + 1 < argc)
            count = atoi(argv[++i]);
        else if (is_flag(argv[i], "-x") && i + 1 < argc)
            expected = atoi(argv[++i]);
        else
            return 2;
    }
    int first = i, last = i;
    while (last < argc && !is_flag(argv[last], "--"))
        last++;
    *at = last < argc ? last + 1 : last;
    if (last - first < 2 || count < 1)
        return 2;

    const char *service = argv[first], *user = argv[first + 1];
    struct script s = {.answers = argv + first + 2, .count = last - first - 2};
    struct fd_set_list after_first, after_last;
    int all_expected = 1;
    for (int t = 0; t < count; t++) {
        pam_handle_t *pamh = NULL;
        struct pam_conv conv = {scripted_conv, &s};
        s.next = 0;
        int rc = pam_start(service, user, &conv, &pamh);
        if (rc == PAM_SUCCESS)
            rc = pam_authenticate(pamh, flags);
        int end = pam_end(pamh, rc);
        if (end != PAM_SUCCESS)
            fprintf(stderr, "pam_end: %d\n", end);
        if (rc >= 0 && rc < 64)
            tally[rc]++;
        if (rc != expected)
            all_expected = 0;
        if (t == 0)
            open_fds(&after_first);
    }
    open_fds(&after_last);
    printf("case %d: %s\n", number, service);
    for (int c = 0; c < 64; c++)
        if (tally[c] > 0)
            printf("code %d: %d\n", c, tally[c]);
    print_fds("first", &after_first);
    print_fds("last", &after_last);
    fflush(stdout);
    return expected < 0 || all_expected ? 0 : 1;
}

int main(int argc, char **argv)
{
    int at = 1, number = 0, status = 0;
    if (argc < 3) {
        fprintf(stderr, "usage: driver CASE [-- CASE ...]; CASE: [-s] [-n COUNT] [-x EXPECTED] SERVICE USER [ANSWER...]\n");
        return 2;
    }
    while (at < argc) {
        int rc = run_case(argc, argv, &at, ++number);
        if (rc == 2) {
            fprintf(stderr, "driver: case %d: usage: [-s] [-n COUNT] [-x EXPECTED] SERVICE USER [ANSWER...]\n", number);
            return 2;
        }
        if (rc != 0)
            status = 1;
    }
    return status;
}
