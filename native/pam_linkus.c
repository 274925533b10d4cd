/*
 * pam_linkus.so: relays a PAM login to linkusd over its PAM socket (docs/protocol.md, version 1).
 *
 * No policy lives here: parse the options, connect to a root-owned socket whose peer is root, send
 * the PAM items, relay each PROMPT/INFO through the PAM conversation and map the daemon's RESULT to
 * a PAM code. Everything that is not an explicit OUTCOME success ends in something other than
 * PAM_SUCCESS; every error path writes one log line and returns PAM_AUTHINFO_UNAVAIL.
 *
 * The login process may be setuid root (su, sudo): no environment, no PATH, no exec, no config file,
 * no openlog()/syslog() (that would change the host program's ident and facility).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#define PAM_SM_AUTH
#define PAM_SM_ACCOUNT
#define PAM_SM_SESSION
#define PAM_SM_PASSWORD
#include <security/pam_modules.h>

#define DEFAULT_SOCKET "/run/linkusd/pam.sock"
#define DEFAULT_LOG_SOCKET "/dev/log"
#define DEFAULT_SPLIT_PROMPT "Password and verification code: "
#define KEPT_DATA "pam_linkus_kept_code"

#define PROTO_VERSION 1
#define FRAME_MAX 4096      /* body length limit of the PAM socket */
#define ANSWER_CUT 257      /* an answer over 256 bytes is cut to 257: the daemon sees it was too long */
#define TEXT_MAX 512
#define KEPT_MAX 16
#define EXCHANGES_MAX 16    /* PROMPT + INFO frames per transaction */
#define PROMPT_OPT_MAX 200
#define PROFILE_MAX 64
#define SECRET_MAX 1024     /* forward_pass: password and code typed together */
#define OPT_SHOWN 40        /* an option is shown in the log cut to this many bytes */

enum msg_type {
    T_START = 0x01, T_ANSWER = 0x02, T_NO_ANSWER = 0x03,
    T_PROMPT = 0x10, T_INFO = 0x11, T_RESULT = 0x20, T_SPLIT = 0x21,
};

enum field_tag {
    F_MODE = 0x01, F_USER, F_SERVICE, F_PROFILE, F_RHOST, F_TTY, F_RUSER, F_FLAGS, F_KEPT,
    F_TEXT, F_STYLE, F_OUTCOME, F_DIGITS, F_JSON, F_PROMPT, F_DEADLINE, F_COUNT,
};

#define CLOCK_MONOTONIC_MS 1  /* DEADLINE's clock byte: CLOCK_MONOTONIC in milliseconds */
#define DEADLINE_LEN 9        /* clock:u8, ms:u64 big-endian */

enum { MODE_AUTH = 1, MODE_SPLIT = 2 };
enum { FLAG_SILENT = 1u << 0, FLAG_ECHO_CODE = 1u << 1 };
enum { STYLE_ECHO_OFF = 1, STYLE_ECHO_ON = 2, STYLE_ERROR = 3, STYLE_INFO = 4 };

#define BIT(tag) (1u << (tag))

/* The options of the PAM line, typed; pointers refer to libpam's argv, valid during the call. */
struct options {
    const char *socket_path;
    const char *log_socket;
    const char *prompt;   /* NULL: the daemon's own prompt */
    const char *profile;  /* NULL: the daemon uses the service name */
    int timeout_ms;
    bool echo_code;
    bool forward_pass;
    bool debug;
};

/* One authentication: the handle, its options and items, the connection. */
/* What the person sees when no decision could be had (docs/break-glass.md): fixed, so it tells nothing. */
#define UNAVAILABLE_MESSAGE "Two-factor authentication is unavailable; contact your administrator."

struct login {
    pam_handle_t *pamh;
    struct options opt;
    int flags;
    int fd;
    const char *service;
    const char *user;
    const char *rhost;
    const char *tty;
    const char *ruser;
    bool decided;  /* linkusd gave its final word (it tells the person itself what went wrong) */
    long long reply_by;  /* the DEADLINE sent with the last START/ANSWER: when we stop waiting (0: none) */
    bool waited_out;     /* we gave up waiting for linkusd's frame: it still holds the login and logs it */
    bool heard;          /* a whole frame came from linkusd: it took the connection */
    const char *why;     /* the reason of the login's own line when linkusd took no part (log_undecided) */
};

/* linkusd closes a connection it turns away (a caller not allowed, or over a cap) at once, reading nothing. */
#define TURNED_AWAY "linkusd turned the connection away (a caller not allowed, or over a cap: see linkusd's log)"

struct frame_out {
    uint8_t buf[4 + FRAME_MAX];
    size_t len;
    bool overflow;
};

struct field_in {
    const uint8_t *val;
    uint16_t len;
    bool present;
};

struct frame_in {
    uint8_t body[FRAME_MAX];
    uint8_t type;
    struct field_in field[F_COUNT];
};

/* What the first line of a single-field stack leaves for the second: the code typed after the password. */
struct kept_code {
    size_t len;
    char code[KEPT_MAX + 1];
};

/* ---------------------------------------------------------------- logging */

static void escape_into(char *out, size_t cap, const char *in)
{
    static const char hex[] = "0123456789abcdef";
    size_t o = 0;
    for (const unsigned char *p = (const unsigned char *)in; *p != '\0'; p++) {
        bool ctl = *p < 0x20 || *p == 0x7f || *p == '\\';
        if (o + (ctl ? 4 : 1) >= cap)
            break;
        if (ctl) {
            out[o++] = '\\';
            out[o++] = 'x';
            out[o++] = hex[*p >> 4];
            out[o++] = hex[*p & 0xf];
        } else {
            out[o++] = (char)*p;
        }
    }
    out[o] = '\0';
}

/* A value as pam_linkus/logline.py's quote() writes it: in double quotes, with '"', '\\', '=' and every
 * byte outside printable ASCII as \xNN, so no value can forge another field; cut to `keep` input bytes. */
static void quote_into(char *out, size_t cap, const char *in, size_t keep)
{
    static const char hex[] = "0123456789abcdef";
    size_t o = 0, i = 0;
    const unsigned char *p = (const unsigned char *)(in != NULL ? in : "-");

    if (cap < 6)
        return;
    out[o++] = '"';
    for (; p[i] != '\0' && i < keep && o + 4 + 5 < cap; i++) {
        if (p[i] < 0x20 || p[i] > 0x7e || p[i] == '"' || p[i] == '\\' || p[i] == '=') {
            out[o++] = '\\';
            out[o++] = 'x';
            out[o++] = hex[p[i] >> 4];
            out[o++] = hex[p[i] & 0xf];
        } else {
            out[o++] = (char)p[i];
        }
    }
    if (p[i] != '\0') {
        memcpy(out + o, "...", 3);
        o += 3;
    }
    out[o++] = '"';
    out[o] = '\0';
}

static void send_log(const struct login *lg, int level, const char *msg);

/* One RFC 3164 datagram to log_socket, never blocking; control characters of every item are escaped. */
__attribute__((format(printf, 3, 4)))
static void lk_log(const struct login *lg, int level, const char *fmt, ...)
{
    char raw[512], msg[1024];
    va_list ap;

    va_start(ap, fmt);
    int n = vsnprintf(raw, sizeof raw, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    escape_into(msg, sizeof msg, raw);
    send_log(lg, level, msg);
}

/* Send one line whose message is already escaped. */
static void send_log(const struct login *lg, int level, const char *msg)
{
    static const char *const months[12] = {
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
    char svc[100], line[1600];
    int n;

    escape_into(svc, 64, lg->service != NULL ? lg->service : "?");

    time_t now = time(NULL);
    struct tm tm;
    if (localtime_r(&now, &tm) == NULL)
        memset(&tm, 0, sizeof tm);
    n = snprintf(line, sizeof line, "<%d>%s %2d %02d:%02d:%02d pam_linkus(%s:auth)[%ld]: %s",
                 LOG_AUTHPRIV | level, months[(unsigned)tm.tm_mon % 12], tm.tm_mday, tm.tm_hour,
                 tm.tm_min, tm.tm_sec, svc, (long)getpid(), msg);
    if (n < 0)
        return;
    size_t len = (size_t)n < sizeof line ? (size_t)n : sizeof line - 1;

    const char *path = lg->opt.log_socket != NULL ? lg->opt.log_socket : DEFAULT_LOG_SOCKET;
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof addr.sun_path)
        return;
    strcpy(addr.sun_path, path);
    int saved = errno;
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd >= 0) {
        (void)sendto(fd, line, len, MSG_DONTWAIT | MSG_NOSIGNAL, (const struct sockaddr *)&addr,
                     sizeof addr);
        (void)close(fd);
    }
    errno = saved;
}

#define DEBUG(lg, ...) do { if ((lg)->opt.debug) lk_log((lg), LOG_DEBUG, __VA_ARGS__); } while (0)

/*
 * A login that linkusd did not take (it could not be reached, turned the connection away, closed it or
 * broke the protocol) still leaves one line like linkusd's own per login: service, user, rhost, outcome.
 * Not when we only gave up waiting: linkusd holds that login and ends it with its own line (as
 * `conversation`: it decides nothing after our DEADLINE), and a second line would contradict it.
 */
static void log_undecided(const struct login *lg, int rc)
{
    char svc[64 * 4 + 8], user[100 * 4 + 8], rhost[100 * 4 + 8], msg[1200];

    quote_into(svc, sizeof svc, lg->service, 64);
    quote_into(user, sizeof user, lg->user, 100);
    quote_into(rhost, sizeof rhost, lg->rhost != NULL && lg->rhost[0] != '\0' ? lg->rhost : "-", 100);
    snprintf(msg, sizeof msg, "service=%s user=%s rhost=%s outcome=\"%s\" reason=\"%s\"", svc, user, rhost,
             rc == PAM_CONV_ERR ? "conversation" : "unavailable", lg->why != NULL ? lg->why : "no decision from linkusd");
    send_log(lg, rc == PAM_CONV_ERR ? LOG_NOTICE : LOG_ERR, msg);
}

/*
 * We gave up waiting for linkusd's frame: linkusd holds the login and ends it with its own line (when it
 * resumes), so this line has no outcome (it would count the login twice), but it names the login
 * (service, user, rhost): if linkusd never resumes (stopped, then killed) the login is still attributable.
 */
static void log_waited_out(const struct login *lg)
{
    char svc[64 * 4 + 8], user[100 * 4 + 8], rhost[100 * 4 + 8], msg[1400];

    quote_into(svc, sizeof svc, lg->service, 64);
    quote_into(user, sizeof user, lg->user, 100);
    quote_into(rhost, sizeof rhost, lg->rhost != NULL && lg->rhost[0] != '\0' ? lg->rhost : "-", 100);
    snprintf(msg, sizeof msg, "linkusd unavailable: no whole frame within the timeout; service=%s user=%s rhost=%s "
             "(linkusd ends this login with its own line when it answers again)", svc, user, rhost);
    send_log(lg, LOG_ERR, msg);
}

/* ---------------------------------------------------------------- options */

enum opt_id { O_SOCKET, O_TIMEOUT, O_PROMPT, O_PROFILE, O_LOG_SOCKET, O_ECHO_CODE, O_FORWARD_PASS, O_DEBUG };

static const struct {
    const char *name;
    bool has_value;
} OPTION_DEFS[] = {
    [O_SOCKET] = {"socket", true},        [O_TIMEOUT] = {"timeout", true},
    [O_PROMPT] = {"prompt", true},        [O_PROFILE] = {"profile", true},
    [O_LOG_SOCKET] = {"log_socket", true}, [O_ECHO_CODE] = {"echo_code", false},
    [O_FORWARD_PASS] = {"forward_pass", false}, [O_DEBUG] = {"debug", false},
};
#define OPTION_COUNT (sizeof OPTION_DEFS / sizeof OPTION_DEFS[0])

static bool socket_path_ok(const char *v)
{
    return v[0] == '/' && strlen(v) < sizeof(((struct sockaddr_un *)0)->sun_path);
}

static bool timeout_ok(const char *v, int *ms)
{
    int n = 0;
    size_t i = 0;
    for (; v[i] != '\0'; i++) {
        if (i >= 3 || v[i] < '0' || v[i] > '9')
            return false;
        n = n * 10 + (v[i] - '0');
    }
    if (n < 1 || n > 300)
        return false;
    *ms = n * 1000;
    return true;
}

static bool profile_ok(const char *v)
{
    size_t n = strlen(v);
    if (n < 1 || n > PROFILE_MAX)
        return false;
    for (size_t i = 0; i < n; i++) {
        char ch = v[i];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
              ch == '_' || ch == '.' || ch == '-'))
            return false;
    }
    return true;
}

/* Check one value; false leaves a reason in err. */
static bool apply_option(struct options *o, enum opt_id id, const char *v, char *err, size_t errlen)
{
    switch (id) {
    case O_SOCKET:
    case O_LOG_SOCKET:
        if (!socket_path_ok(v)) {
            snprintf(err, errlen, "option %s= needs an absolute path shorter than 108 bytes",
                     OPTION_DEFS[id].name);
            return false;
        }
        if (id == O_SOCKET)
            o->socket_path = v;
        else
            o->log_socket = v;
        return true;
    case O_TIMEOUT:
        if (!timeout_ok(v, &o->timeout_ms)) {
            snprintf(err, errlen, "option timeout= needs whole seconds 1..300, not %.*s", OPT_SHOWN, v);
            return false;
        }
        return true;
    case O_PROMPT:
        if (strlen(v) > PROMPT_OPT_MAX) {
            snprintf(err, errlen, "option prompt= is longer than %d bytes", PROMPT_OPT_MAX);
            return false;
        }
        o->prompt = v;
        return true;
    case O_PROFILE:
        if (!profile_ok(v)) {
            snprintf(err, errlen, "option profile= needs 1..64 of [A-Za-z0-9_.-], not %.*s", OPT_SHOWN, v);
            return false;
        }
        o->profile = v;
        return true;
    case O_ECHO_CODE:
        o->echo_code = true;
        return true;
    case O_FORWARD_PASS:
        o->forward_pass = true;
        return true;
    case O_DEBUG:
        o->debug = true;
        return true;
    }
    return false;
}

/* Parse every option; the first error is kept in err (logged by the caller once log_socket is known). */
static bool parse_options(struct options *o, int argc, const char **argv, char *err, size_t errlen)
{
    unsigned seen = 0;
    bool ok = true;

    *o = (struct options){.socket_path = DEFAULT_SOCKET, .log_socket = DEFAULT_LOG_SOCKET, .timeout_ms = 15000};
    for (int i = 0; i < argc; i++) {
        const char *arg = argv[i] != NULL ? argv[i] : "";
        const char *eq = strchr(arg, '=');
        size_t name_len = eq != NULL ? (size_t)(eq - arg) : strlen(arg);
        char e[200];
        size_t id = 0;

        e[0] = '\0';
        if ((name_len == 6 && strncmp(arg, "config", 6) == 0) ||
            (name_len == 9 && strncmp(arg, "cache_dir", 9) == 0)) {
            snprintf(e, sizeof e, "option %.*s belongs to the old pam_python module: run linkus-2fa migrate-pam",
                     (int)(name_len < OPT_SHOWN ? name_len : OPT_SHOWN), arg);
        } else {
            for (id = 0; id < OPTION_COUNT; id++)
                if (strlen(OPTION_DEFS[id].name) == name_len && strncmp(OPTION_DEFS[id].name, arg, name_len) == 0)
                    break;
            if (id == OPTION_COUNT)
                snprintf(e, sizeof e, "unknown option %.*s", OPT_SHOWN, arg);
            else if (seen & (1u << id))
                snprintf(e, sizeof e, "option %s given twice", OPTION_DEFS[id].name);
            else if (!OPTION_DEFS[id].has_value && eq != NULL)
                snprintf(e, sizeof e, "option %s takes no value", OPTION_DEFS[id].name);
            else if (OPTION_DEFS[id].has_value && (eq == NULL || eq[1] == '\0'))
                snprintf(e, sizeof e, "option %s= needs a value", OPTION_DEFS[id].name);
            else if (!apply_option(o, (enum opt_id)id, eq != NULL ? eq + 1 : "", e, sizeof e) && e[0] == '\0')
                snprintf(e, sizeof e, "bad option %.*s", OPT_SHOWN, arg);
            if (id < OPTION_COUNT)
                seen |= 1u << id;
        }
        if (e[0] != '\0' && ok) {
            snprintf(err, errlen, "%s", e);
            ok = false;
        }
    }
    return ok;
}

/* ---------------------------------------------------------------- socket I/O with deadlines */

static long long now_ms(void)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0)
        return 0;
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Wait for events until the deadline: 1 ready, 0 timed out, -1 error. */
static int wait_fd(int fd, short events, long long deadline)
{
    for (;;) {
        long long left = deadline - now_ms();
        if (left <= 0)
            return 0;
        struct pollfd p = {.fd = fd, .events = events};
        int rc = poll(&p, 1, left > 60000 ? 60000 : (int)left);
        if (rc > 0)
            return 1;
        if (rc < 0 && errno != EINTR)
            return -1;
    }
}

/* 0 sent all, 1 the peer closed (EPIPE, ECONNRESET), -1 timeout or error. */
static int send_all(int fd, const uint8_t *buf, size_t len, long long deadline)
{
    while (len > 0) {
        ssize_t n = send(fd, buf, len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) {
            buf += n;
            len -= (size_t)n;
        } else if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
            if (wait_fd(fd, POLLOUT, deadline) != 1)
                return -1;
        } else {
            return n < 0 && (errno == EPIPE || errno == ECONNRESET) ? 1 : -1;
        }
    }
    return 0;
}

/* 0 read all, 1 the peer closed, -1 timeout or error; *got counts the bytes read. */
static int recv_exact(int fd, uint8_t *buf, size_t len, long long deadline, size_t *got)
{
    *got = 0;
    while (len > 0) {
        int w = wait_fd(fd, POLLIN, deadline);
        if (w != 1)
            return -1;
        ssize_t n = recv(fd, buf, len, MSG_DONTWAIT);
        if (n == 0)
            return 1;
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                continue;
            return errno == ECONNRESET ? 1 : -1;  /* closed with our frame unread: closed all the same */
        }
        buf += n;
        len -= (size_t)n;
        *got += (size_t)n;
    }
    return 0;
}

/* ---------------------------------------------------------------- connect */

/* The socket and its directory must be root's: nobody else can put a fake daemon there. */
static bool path_trusted(const struct login *lg)
{
    const char *path = lg->opt.socket_path;
    char dir[sizeof(((struct sockaddr_un *)0)->sun_path)];
    struct stat st;

    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash == dir)
        slash[1] = '\0';
    else if (slash != NULL)
        *slash = '\0';
    if (lstat(dir, &st) != 0) {
        lk_log(lg, LOG_ERR, "linkusd unavailable: directory %s: %m", dir);
        return false;
    }
    if (!S_ISDIR(st.st_mode) || st.st_uid != 0 || (st.st_mode & (S_IWGRP | S_IWOTH)) != 0) {
        lk_log(lg, LOG_ERR, "refusing %s: its directory is not a root-owned directory closed to group and others", path);
        return false;
    }
    if (lstat(path, &st) != 0) {
        lk_log(lg, LOG_ERR, "linkusd unavailable: %s: %m", path);
        return false;
    }
    if (S_ISLNK(st.st_mode)) {
        lk_log(lg, LOG_ERR, "refusing %s: it is a symlink", path);
        return false;
    }
    if (!S_ISSOCK(st.st_mode) || st.st_uid != 0) {
        lk_log(lg, LOG_ERR, "refusing %s: not a socket owned by root", path);
        return false;
    }
    return true;
}

static bool connect_daemon(struct login *lg)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    long long deadline = now_ms() + lg->opt.timeout_ms;

    DEBUG(lg, "connecting to %s", lg->opt.socket_path);
    if (!path_trusted(lg))
        return false;
    strcpy(addr.sun_path, lg->opt.socket_path);  /* length checked by the option parser */
    lg->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (lg->fd < 0) {
        lk_log(lg, LOG_ERR, "linkusd unavailable: socket: %m");
        return false;
    }
    for (;;) {
        if (connect(lg->fd, (const struct sockaddr *)&addr, sizeof addr) == 0)
            break;
        if (errno == EINPROGRESS) {
            int soerr = 0;
            socklen_t sl = sizeof soerr;
            if (wait_fd(lg->fd, POLLOUT, deadline) != 1 ||
                getsockopt(lg->fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) != 0 || soerr != 0) {
                lk_log(lg, LOG_ERR, "linkusd unavailable: cannot connect to %s in time", lg->opt.socket_path);
                return false;
            }
            break;
        }
        /* A Unix socket whose backlog is full says EAGAIN: retry until the deadline. */
        if ((errno == EAGAIN || errno == EINTR) && now_ms() < deadline) {
            (void)poll(NULL, 0, 20);
            continue;
        }
        lk_log(lg, LOG_ERR, "linkusd unavailable: connect %s: %m", lg->opt.socket_path);
        return false;
    }
    struct ucred cred;
    socklen_t cl = sizeof cred;
    if (getsockopt(lg->fd, SOL_SOCKET, SO_PEERCRED, &cred, &cl) != 0 || cl != sizeof cred) {
        lk_log(lg, LOG_ERR, "refusing %s: no peer credentials", lg->opt.socket_path);
        return false;
    }
    if (cred.uid != 0) {
        lk_log(lg, LOG_ERR, "refusing %s: the peer runs as uid %u, not root", lg->opt.socket_path,
               (unsigned)cred.uid);
        return false;
    }
    return true;
}

/* ---------------------------------------------------------------- frames */

static void out_begin(struct frame_out *f, uint8_t type)
{
    f->buf[4] = PROTO_VERSION;
    f->buf[5] = type;
    f->len = 6;
    f->overflow = false;
}

static void out_field(struct frame_out *f, uint8_t tag, const void *val, size_t len)
{
    if (f->overflow || len > 0xffff || f->len + 3 + len > sizeof f->buf) {
        f->overflow = true;
        return;
    }
    f->buf[f->len] = tag;
    f->buf[f->len + 1] = (uint8_t)(len >> 8);
    f->buf[f->len + 2] = (uint8_t)(len & 0xff);
    if (len > 0)
        memcpy(f->buf + f->len + 3, val, len);
    f->len += 3 + len;
}

/* Send the frame and wipe it: it may hold an answer or a kept code. */
static bool out_send(struct login *lg, struct frame_out *f, const char *name)
{
    bool ok = !f->overflow;
    if (ok) {
        size_t body = f->len - 4;
        f->buf[0] = 0;
        f->buf[1] = 0;
        f->buf[2] = (uint8_t)(body >> 8);
        f->buf[3] = (uint8_t)(body & 0xff);
        int rc = send_all(lg->fd, f->buf, f->len, now_ms() + lg->opt.timeout_ms);
        ok = rc == 0;
        if (rc == 1 && !lg->heard)
            lg->why = TURNED_AWAY;  /* said once, in the login's own line */
        else if (!ok)
            lk_log(lg, LOG_ERR, "linkusd unavailable: cannot send %s: %m", name);
        else
            DEBUG(lg, "sent %s", name);
    } else {
        lk_log(lg, LOG_ERR, "%s frame over the size limit", name);
    }
    explicit_bzero(f->buf, sizeof f->buf);
    return ok;
}

static const struct {
    uint8_t type;
    const char *name;
    unsigned allowed;
    unsigned required;
} INCOMING[] = {
    {T_PROMPT, "PROMPT", BIT(F_STYLE) | BIT(F_TEXT), BIT(F_STYLE) | BIT(F_TEXT)},
    {T_INFO, "INFO", BIT(F_STYLE) | BIT(F_TEXT), BIT(F_STYLE) | BIT(F_TEXT)},
    {T_RESULT, "RESULT", BIT(F_OUTCOME), BIT(F_OUTCOME)},
    {T_SPLIT, "SPLIT", BIT(F_DIGITS) | BIT(F_TEXT), BIT(F_DIGITS)},
};

static const char *type_name(uint8_t type)
{
    for (size_t i = 0; i < sizeof INCOMING / sizeof INCOMING[0]; i++)
        if (INCOMING[i].type == type)
            return INCOMING[i].name;
    return "?";
}

/* Field size limits of the daemon's messages (docs/protocol.md, "Fields"). */
static bool field_size_ok(uint8_t tag, uint16_t len)
{
    switch (tag) {
    case F_STYLE:
    case F_OUTCOME:
    case F_DIGITS:
        return len == 1;
    case F_TEXT:
        return len <= TEXT_MAX;
    default:
        return false;
    }
}

/* Read one whole frame within timeout= (by the DEADLINE we sent, if any) and check it against the spec;
 * false after one log line. */
static bool recv_frame(struct login *lg, struct frame_in *fr)
{
    long long deadline = lg->reply_by > 0 ? lg->reply_by : now_ms() + lg->opt.timeout_ms;
    uint8_t head[4];
    lg->reply_by = 0;
    size_t bytes = 0;
    int rc = recv_exact(lg->fd, head, sizeof head, deadline, &bytes);
    size_t len = 0;
    bool silent = rc > 0 && bytes == 0;  /* closed without a byte: it never took the connection */

    if (rc == 0) {
        len = (size_t)head[0] << 24 | (size_t)head[1] << 16 | (size_t)head[2] << 8 | head[3];
        if (len < 2 || len > FRAME_MAX) {
            lk_log(lg, LOG_ERR, "linkusd protocol error: frame length %zu out of range", len);
            return false;
        }
        rc = recv_exact(lg->fd, fr->body, len, deadline, &bytes);
    }
    if (silent && !lg->heard) {
        lg->why = TURNED_AWAY;  /* said once, in the login's own line */
        return false;
    }
    if (rc != 0) {
        lg->waited_out = rc < 0 && now_ms() >= deadline;
        if (lg->waited_out)
            log_waited_out(lg);
        else
            lk_log(lg, LOG_ERR, rc > 0 ? "linkusd closed the connection before its result"
                                       : "linkusd unavailable: cannot read its frame: %m");
        return false;
    }
    if (fr->body[0] != PROTO_VERSION) {
        lk_log(lg, LOG_ERR, "linkusd protocol error: version %u", fr->body[0]);
        return false;
    }
    fr->type = fr->body[1];
    size_t k = 0;
    while (k < sizeof INCOMING / sizeof INCOMING[0] && INCOMING[k].type != fr->type)
        k++;
    if (k == sizeof INCOMING / sizeof INCOMING[0]) {
        lk_log(lg, LOG_ERR, "linkusd protocol error: unknown message type 0x%02x", fr->type);
        return false;
    }
    memset(fr->field, 0, sizeof fr->field);
    unsigned got = 0;
    for (size_t pos = 2; pos < len;) {
        if (len - pos < 3) {
            lk_log(lg, LOG_ERR, "linkusd protocol error: truncated field header in %s", INCOMING[k].name);
            return false;
        }
        uint8_t tag = fr->body[pos];
        uint16_t flen = (uint16_t)(fr->body[pos + 1] << 8 | fr->body[pos + 2]);
        pos += 3;
        if (tag >= F_COUNT || (INCOMING[k].allowed & BIT(tag)) == 0) {
            lk_log(lg, LOG_ERR, "linkusd protocol error: field 0x%02x not allowed in %s", tag, INCOMING[k].name);
            return false;
        }
        if (got & BIT(tag)) {
            lk_log(lg, LOG_ERR, "linkusd protocol error: field 0x%02x repeated in %s", tag, INCOMING[k].name);
            return false;
        }
        if (flen > len - pos) {
            lk_log(lg, LOG_ERR, "linkusd protocol error: field 0x%02x overruns %s", tag, INCOMING[k].name);
            return false;
        }
        if (!field_size_ok(tag, flen)) {
            lk_log(lg, LOG_ERR, "linkusd protocol error: field 0x%02x of %u bytes in %s", tag, flen,
                   INCOMING[k].name);
            return false;
        }
        got |= BIT(tag);
        fr->field[tag] = (struct field_in){.val = fr->body + pos, .len = flen, .present = true};
        pos += flen;
    }
    if ((got & INCOMING[k].required) != INCOMING[k].required) {
        lk_log(lg, LOG_ERR, "linkusd protocol error: %s without a required field", INCOMING[k].name);
        return false;
    }
    DEBUG(lg, "received %s", INCOMING[k].name);
    lg->heard = true;
    return true;
}

/* A TEXT field as a C string; a NUL inside is a protocol error. */
static bool text_field(const struct login *lg, const struct frame_in *fr, char out[TEXT_MAX + 1])
{
    const struct field_in *t = &fr->field[F_TEXT];
    size_t n = t->present ? t->len : 0;
    if (n > 0 && memchr(t->val, '\0', n) != NULL) {
        lk_log(lg, LOG_ERR, "linkusd protocol error: NUL in the text of %s", type_name(fr->type));
        return false;
    }
    if (n > 0)
        memcpy(out, t->val, n);
    out[n] = '\0';
    return true;
}

/* ---------------------------------------------------------------- conversation */

static void drop_response(struct pam_response *resp)
{
    if (resp == NULL)
        return;
    if (resp->resp != NULL) {
        explicit_bzero(resp->resp, strlen(resp->resp));
        free(resp->resp);
    }
    free(resp);
}

/*
 * Ask (or tell) the person one line. An answer is copied into out (at most cap bytes, NUL-terminated:
 * out has cap + 1 bytes) and its length returned; -1 when the conversation failed or gave no answer.
 */
static long converse(const struct login *lg, int style, const char *text, char *out, size_t cap)
{
    const struct pam_conv *conv = NULL;
    struct pam_response *resp = NULL;
    long got = -1;

    if (pam_get_item(lg->pamh, PAM_CONV, (const void **)&conv) != PAM_SUCCESS || conv == NULL || conv->conv == NULL)
        return -1;
    const struct pam_message msg = {.msg_style = style, .msg = text};
    const struct pam_message *msgp = &msg;
    int rc = conv->conv(1, &msgp, &resp, conv->appdata_ptr);
    if (rc == PAM_SUCCESS && out != NULL && resp != NULL && resp->resp != NULL) {
        size_t n = strnlen(resp->resp, cap);
        memcpy(out, resp->resp, n);
        out[n] = '\0';
        got = (long)n;
    } else if (rc == PAM_SUCCESS && out == NULL) {
        got = 0;
    }
    drop_response(resp);
    return got;
}

/* ---------------------------------------------------------------- transaction */

/*
 * DEADLINE: from now, we wait timeout= for linkusd's next frame and then give up. linkusd reads the same
 * CLOCK_MONOTONIC and decides nothing (spends no code, counts or resets no failure) once that moment is
 * near: a late answer is never decided for a login that already ended here as unavailable.
 */
static void out_deadline(struct login *lg, struct frame_out *f)
{
    uint8_t v[DEADLINE_LEN];
    lg->reply_by = now_ms() + lg->opt.timeout_ms;
    uint64_t ms = (uint64_t)lg->reply_by;
    v[0] = CLOCK_MONOTONIC_MS;
    for (int i = 0; i < 8; i++)
        v[1 + i] = (uint8_t)(ms >> (56 - 8 * i));
    out_field(f, F_DEADLINE, v, sizeof v);
}

static bool send_start(struct login *lg, uint8_t mode, const struct kept_code *kept)
{
    static struct frame_out zero;
    struct frame_out f = zero;
    uint32_t flags = ((lg->flags & (int)PAM_SILENT) != 0 ? FLAG_SILENT : 0) | (lg->opt.echo_code ? FLAG_ECHO_CODE : 0);
    uint8_t flag_bytes[4] = {(uint8_t)(flags >> 24), (uint8_t)(flags >> 16), (uint8_t)(flags >> 8), (uint8_t)flags};
    size_t ulen = strlen(lg->user), slen = strlen(lg->service);

    out_begin(&f, T_START);
    out_field(&f, F_MODE, &mode, 1);
    out_field(&f, F_USER, lg->user, ulen);
    out_field(&f, F_SERVICE, lg->service, slen);
    if (lg->opt.profile != NULL)
        out_field(&f, F_PROFILE, lg->opt.profile, strlen(lg->opt.profile));
    if (lg->rhost != NULL)
        out_field(&f, F_RHOST, lg->rhost, strlen(lg->rhost));
    if (lg->tty != NULL)
        out_field(&f, F_TTY, lg->tty, strlen(lg->tty));
    if (lg->ruser != NULL)
        out_field(&f, F_RUSER, lg->ruser, strlen(lg->ruser));
    out_field(&f, F_FLAGS, flag_bytes, sizeof flag_bytes);
    if (kept != NULL)
        out_field(&f, F_KEPT, kept->code, kept->len);
    if (mode == MODE_AUTH && lg->opt.prompt != NULL)
        out_field(&f, F_PROMPT, lg->opt.prompt, strlen(lg->opt.prompt));
    out_deadline(lg, &f);
    return out_send(lg, &f, "START");
}

/* The PAM items fit their fields (docs/protocol.md, "Fields"): checked before connecting, so a login
 * refused for them costs linkusd nothing and leaves one line. An empty user name goes to linkusd like
 * any other: it refuses it (denied) and logs the login. */
static bool items_fit(const struct login *lg)
{
    size_t slen = strlen(lg->service);
    return strlen(lg->user) <= 256 && slen >= 1 && slen <= 128 && (lg->rhost == NULL || strlen(lg->rhost) <= 1024) &&
           (lg->tty == NULL || strlen(lg->tty) <= 256) && (lg->ruser == NULL || strlen(lg->ruser) <= 256);
}

static int map_outcome(struct login *lg, const struct frame_in *fr)
{
    static const int codes[] = {PAM_SUCCESS, PAM_IGNORE, PAM_AUTH_ERR, PAM_MAXTRIES, PAM_AUTHINFO_UNAVAIL,
                                PAM_CONV_ERR};
    uint8_t outcome = fr->field[F_OUTCOME].val[0];
    if (outcome >= sizeof codes / sizeof codes[0]) {
        lk_log(lg, LOG_ERR, "linkusd protocol error: unknown outcome %u", outcome);
        return PAM_AUTHINFO_UNAVAIL;
    }
    DEBUG(lg, "outcome %u", outcome);
    lg->decided = true;
    return codes[outcome];
}

/* Answer one PROMPT: ANSWER with what the person typed (cut to 257 bytes), or NO_ANSWER. */
static bool answer_prompt(struct login *lg, int style, const char *text)
{
    static struct frame_out zero;
    struct frame_out f = zero;
    char answer[ANSWER_CUT + 1];
    long n = converse(lg, style == STYLE_ECHO_ON ? PAM_PROMPT_ECHO_ON : PAM_PROMPT_ECHO_OFF, text, answer,
                      ANSWER_CUT);
    if (n < 0) {
        out_begin(&f, T_NO_ANSWER);
        return out_send(lg, &f, "NO_ANSWER");
    }
    out_begin(&f, T_ANSWER);
    out_field(&f, F_TEXT, answer, (size_t)n);
    out_deadline(lg, &f);
    explicit_bzero(answer, sizeof answer);
    return out_send(lg, &f, "ANSWER");
}

/* MODE=1: relay PROMPT/INFO until RESULT. */
static int relay(struct login *lg)
{
    struct frame_in fr;
    char text[TEXT_MAX + 1];
    int exchanges = 0;

    for (;;) {
        if (!recv_frame(lg, &fr))
            return PAM_AUTHINFO_UNAVAIL;
        if (fr.type == T_RESULT)
            return map_outcome(lg, &fr);
        if (fr.type != T_PROMPT && fr.type != T_INFO) {
            lk_log(lg, LOG_ERR, "linkusd protocol error: unexpected %s", type_name(fr.type));
            return PAM_AUTHINFO_UNAVAIL;
        }
        if (++exchanges > EXCHANGES_MAX) {
            lk_log(lg, LOG_ERR, "linkusd protocol error: more than %d prompts", EXCHANGES_MAX);
            return PAM_AUTHINFO_UNAVAIL;
        }
        uint8_t style = fr.field[F_STYLE].val[0];
        bool prompt = fr.type == T_PROMPT;
        if ((prompt && style != STYLE_ECHO_OFF && style != STYLE_ECHO_ON) ||
            (!prompt && style != STYLE_ERROR && style != STYLE_INFO)) {
            lk_log(lg, LOG_ERR, "linkusd protocol error: style %u in %s", style, type_name(fr.type));
            return PAM_AUTHINFO_UNAVAIL;
        }
        if (!text_field(lg, &fr, text))
            return PAM_AUTHINFO_UNAVAIL;
        if (prompt) {
            if (!answer_prompt(lg, style, text))
                return PAM_AUTHINFO_UNAVAIL;
        } else if ((lg->flags & (int)PAM_SILENT) == 0) {
            (void)converse(lg, style == STYLE_ERROR ? PAM_ERROR_MSG : PAM_TEXT_INFO, text, NULL, 0);
        }
    }
}

static void kept_cleanup(pam_handle_t *pamh, void *data, int error_status)
{
    (void)pamh;
    (void)error_status;
    if (data != NULL) {
        explicit_bzero(data, sizeof(struct kept_code));
        free(data);
    }
}

/*
 * forward_pass: split password+code. PAM_AUTHTOK keeps the password for the next module; the last n
 * characters are kept for the second pam_linkus line. The password never crosses the socket.
 */
static int split_secret(struct login *lg, unsigned digits, const char *daemon_prompt)
{
    char asked[SECRET_MAX + 1];
    char password[SECRET_MAX + 1];
    const char *secret = NULL;
    int rc = PAM_AUTHINFO_UNAVAIL;

    if (pam_get_item(lg->pamh, PAM_AUTHTOK, (const void **)&secret) != PAM_SUCCESS || secret == NULL) {
        const char *prompt = lg->opt.prompt != NULL ? lg->opt.prompt
                             : daemon_prompt[0] != '\0' ? daemon_prompt : DEFAULT_SPLIT_PROMPT;
        if (converse(lg, PAM_PROMPT_ECHO_OFF, prompt, asked, SECRET_MAX) < 0) {
            lk_log(lg, LOG_NOTICE, "no password and code given");
            return PAM_CONV_ERR;
        }
        secret = asked;
    }
    size_t len = strnlen(secret, SECRET_MAX);
    if (len >= SECRET_MAX) {
        lk_log(lg, LOG_ERR, "refusing: password and code longer than %d bytes", SECRET_MAX - 1);
        goto out;
    }
    /* With 0 digits the whole answer is the password, and an empty code is kept all the same: it tells
     * the second line that this is a single-field login, which must not prompt (an email extension is
     * refused there without a mail being sent, instead of having its code prompt answered blindly). */
    struct kept_code *kept = calloc(1, sizeof *kept);
    if (kept == NULL) {
        lk_log(lg, LOG_ERR, "out of memory");
        goto out;
    }
    size_t pw_len = len > digits ? len - digits : 0;
    memcpy(password, secret, pw_len);
    password[pw_len] = '\0';
    kept->len = len > digits ? digits : 0;
    memcpy(kept->code, secret + pw_len, kept->len);
    /* Set PAM_AUTHTOK only after copying: libpam frees the old item, which secret may point to. */
    if (pam_set_item(lg->pamh, PAM_AUTHTOK, password) != PAM_SUCCESS) {
        lk_log(lg, LOG_ERR, "cannot set PAM_AUTHTOK");
        kept_cleanup(lg->pamh, kept, 0);
        goto out;
    }
    if (pam_set_data(lg->pamh, KEPT_DATA, kept, kept_cleanup) != PAM_SUCCESS) {
        lk_log(lg, LOG_ERR, "cannot keep the code for the next line");
        kept_cleanup(lg->pamh, kept, 0);
        goto out;
    }
    DEBUG(lg, "split off a code of %zu characters", kept->len);
    rc = PAM_IGNORE;
out:
    explicit_bzero(asked, sizeof asked);
    explicit_bzero(password, sizeof password);
    return rc;
}

/* First line of a single-field stack: ask the daemon how many digits, then split. */
static int first_line(struct login *lg)
{
    struct frame_in fr;
    char text[TEXT_MAX + 1];

    (void)pam_set_data(lg->pamh, KEPT_DATA, NULL, NULL);  /* a stale code from an earlier attempt */
    if (!connect_daemon(lg) || !send_start(lg, MODE_SPLIT, NULL) || !recv_frame(lg, &fr))
        return PAM_AUTHINFO_UNAVAIL;
    (void)close(lg->fd);
    lg->fd = -1;
    if (fr.type == T_RESULT)
        return map_outcome(lg, &fr);
    if (fr.type != T_SPLIT) {
        lk_log(lg, LOG_ERR, "linkusd protocol error: unexpected %s", type_name(fr.type));
        return PAM_AUTHINFO_UNAVAIL;
    }
    unsigned digits = fr.field[F_DIGITS].val[0];
    if (digits > 10) {
        lk_log(lg, LOG_ERR, "linkusd protocol error: SPLIT of %u digits", digits);
        return PAM_AUTHINFO_UNAVAIL;
    }
    if (!text_field(lg, &fr, text))
        return PAM_AUTHINFO_UNAVAIL;
    return split_secret(lg, digits, text);
}

/* Authenticate (MODE=1), with the code a first line kept, if any; that code is used once. */
static int second_line(struct login *lg)
{
    const void *data = NULL;
    const struct kept_code *kept = NULL;
    int rc = PAM_AUTHINFO_UNAVAIL;

    if (pam_get_data(lg->pamh, KEPT_DATA, &data) == PAM_SUCCESS && data != NULL)
        kept = data;
    if (connect_daemon(lg) && send_start(lg, MODE_AUTH, kept))
        rc = relay(lg);
    if (kept != NULL)
        (void)pam_set_data(lg->pamh, KEPT_DATA, NULL, NULL);  /* the cleanup wipes it */
    return rc;
}

PAM_EXTERN int pam_sm_authenticate(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    struct login lg = {.pamh = pamh, .flags = flags, .fd = -1};
    char err[256];
    int rc;

#ifdef LINKUS_CANARY
    {   /* Planted bug for the sanitizer tests: one byte past a heap buffer. */
        volatile size_t at = 8;
        char *probe = malloc(8);
        if (probe != NULL)
            probe[at] = 1;
        free(probe);
    }
#endif
    (void)pam_get_item(pamh, PAM_SERVICE, (const void **)&lg.service);
    if (!parse_options(&lg.opt, argc, argv, err, sizeof err)) {
        lk_log(&lg, LOG_ERR, "refusing the login: %s", err);
        return PAM_AUTHINFO_UNAVAIL;
    }
    if (lg.service == NULL) {
        lk_log(&lg, LOG_ERR, "refusing the login: no PAM service name");
        return PAM_AUTHINFO_UNAVAIL;
    }
    rc = pam_get_user(pamh, &lg.user, NULL);
    if (rc != PAM_SUCCESS || lg.user == NULL) {
        lk_log(&lg, LOG_ERR, "refusing the login: no user name (%d)", rc);
        return rc == PAM_CONV_AGAIN ? PAM_INCOMPLETE : PAM_AUTHINFO_UNAVAIL;
    }
    (void)pam_get_item(pamh, PAM_RHOST, (const void **)&lg.rhost);
    (void)pam_get_item(pamh, PAM_TTY, (const void **)&lg.tty);
    (void)pam_get_item(pamh, PAM_RUSER, (const void **)&lg.ruser);

    if (!items_fit(&lg)) {
        lg.why = "a PAM item (user, service, rhost, tty or ruser) is too long";
        rc = PAM_AUTHINFO_UNAVAIL;
    } else {
        rc = lg.opt.forward_pass ? first_line(&lg) : second_line(&lg);
    }
    if (lg.fd >= 0)
        (void)close(lg.fd);
    if (!lg.decided && !lg.waited_out && (rc == PAM_AUTHINFO_UNAVAIL || rc == PAM_CONV_ERR))
        log_undecided(&lg, rc);
    if (rc == PAM_AUTHINFO_UNAVAIL && !lg.decided && (flags & (int)PAM_SILENT) == 0)
        (void)converse(&lg, PAM_ERROR_MSG, UNAVAILABLE_MESSAGE, NULL, 0);
    return rc;
}

/* Nothing to do outside authentication: PAM_IGNORE, never a success nobody decided. */
PAM_EXTERN int pam_sm_setcred(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    (void)pamh, (void)flags, (void)argc, (void)argv;
    return PAM_IGNORE;
}

PAM_EXTERN int pam_sm_acct_mgmt(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    (void)pamh, (void)flags, (void)argc, (void)argv;
    return PAM_IGNORE;
}

PAM_EXTERN int pam_sm_open_session(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    (void)pamh, (void)flags, (void)argc, (void)argv;
    return PAM_IGNORE;
}

PAM_EXTERN int pam_sm_close_session(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    (void)pamh, (void)flags, (void)argc, (void)argv;
    return PAM_IGNORE;
}

PAM_EXTERN int pam_sm_chauthtok(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    (void)pamh, (void)flags, (void)argc, (void)argv;
    return PAM_IGNORE;
}
