// ferry-shim: the parent of one task incarnation.
//
// Ferry runs every task under a shim so that the task's exit is recorded even when no Ferry
// process is alive, and also after CRIU restored the task (criu restore -d exits and the restored
// tree reparents to us because we are a child subreaper).
//
//   ferry-shim run     DIR INCARNATION HOSTNAME CWD -- CMD [ARGS...]
//   ferry-shim restore DIR INCARNATION PIDFILE      -- CRIU restore ... -d --pidfile PIDFILE
//
// With FERRY_SHIM_GATE=1, restore takes its CRIU command from fd 4 instead (arguments each ended
// by a NUL, then end-of-file) and starts CRIU only then: an agent starts the shim ahead, before
// the images are all there, and its fork+exec of a large agent stays out of the task's pause.
// End-of-file with no command (the agent gave up or died) ends the shim before CRIU ran.
//
// Reports "ok <host pid of the task root>" or "err <reason>" on fd 3, then waits for the task
// root and writes DIR/exit-INCARNATION.json. The task root is a small init (pid 1 of the task's
// PID namespace) that forwards signals, reaps orphans and lives until the task's last process ends.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef CLONE_NEWTIME
#define CLONE_NEWTIME 0x00000080
#endif

static int status_fd = 3;

static void report(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void report(const char *fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
  va_end(ap);
  if (n < 0) return;
  if (n > (int)sizeof buf - 2) n = sizeof buf - 2;
  buf[n++] = '\n';
  if (status_fd >= 0) {
    (void)!write(status_fd, buf, (size_t)n);
    close(status_fd);
    status_fd = -1;
  }
}

static void close_from(int lowfd) {
  if (syscall(SYS_close_range, (unsigned)lowfd, ~0U, 0) == 0) return;
  for (int fd = lowfd; fd < 4096; fd++) close(fd);
}

// ---- the task's init (pid 1 of its PID namespace) -------------------------------------------
static volatile pid_t main_child = -1;
static volatile sig_atomic_t main_alive = 1;

// Stopping signals reach every process of the task (a forked daemon too, as systemd's
// control-group kill does); the others reach the command while it lives, then everyone left.
static void forward(int sig) {
  if (sig == SIGTERM || sig == SIGINT || sig == SIGQUIT || !main_alive) kill(-1, sig);  // pid 1: all but us
  else if (main_child > 0) kill(main_child, sig);
}

// A task with its own address runs in the network namespace Ferry made for it (FERRY_NETNS).
static int join_netns(void) {
  const char *ns = getenv("FERRY_NETNS");
  if (!ns) return 0;
  int fd = open(ns, O_RDONLY | O_CLOEXEC);
  if (fd < 0 || setns(fd, CLONE_NEWNET) != 0) return -1;
  close(fd);
  unsetenv("FERRY_NETNS");
  return 0;
}

/* Unmounts every mount of type TYPE (its mountinfo's field after " - "), most recent first. */
static void detach_all(const char *type) {
  for (int pass = 0; pass < 4096; pass++) {
    FILE *f = fopen("/proc/self/mountinfo", "r");
    if (!f) return;
    char line[8192], found[4096] = "";
    while (fgets(line, sizeof line, f)) {
      char *sep = strstr(line, " - ");
      char mp[4096];
      if (!sep || strncmp(sep + 3, type, strlen(type)) != 0 || sep[3 + strlen(type)] != ' ') continue;
      if (sscanf(line, "%*s %*s %*s %*s %4095s", mp) == 1) snprintf(found, sizeof found, "%s", mp);
    }
    fclose(f);
    // Mount points with escaped characters (\040) are left: rare, and harmless to keep.
    if (!found[0] || strchr(found, '\\') || umount2(found, MNT_DETACH) != 0) return;
  }
}

/*
 * The task's own mount namespace, with a /proc of its own PID namespace: /proc/PID by the pid a
 * process sees names that process (Python's and CRIU's test suites read it). The host's mounts are
 * copied, private, so later mounts on the host do not pile up in the task; the handles of other
 * tasks' namespaces (nsfs) are dropped. CRIU dumps the namespace; Ferry names the host's mounts
 * external (src/runtime/mounts.ts). Without it (no permission) the task sees the host's /proc.
 */
static int own_mounts(int logfd) {
  if (unshare(CLONE_NEWNS) != 0) {
    dprintf(logfd, "ferry: warning: no mount namespace for the task (%s): it sees the host's /proc\n", strerror(errno));
    return 0;
  }
  if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0) return -1;
  detach_all("nsfs");
  // Whatever was mounted under the host's /proc (binfmt_misc, ...) goes with it.
  (void)umount2("/proc", MNT_DETACH);
  if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) != 0) return -1;
  return 1;
}

static void init_main(const char *dir, const char *cwd, int logfd, char **argv);

static void run_init(const char *dir, const char *hostname, const char *cwd, const char *logpath, int logfd, char **argv) {
  setsid();  // CRIU needs the session leader inside the task's PID namespace
  if (join_netns() != 0) {
    dprintf(logfd, "ferry: cannot join the task's network namespace: %s\n", strerror(errno));
    _exit(125);
  }
  if (unshare(CLONE_NEWUTS | CLONE_NEWIPC) != 0) {
    dprintf(logfd, "ferry: cannot create UTS/IPC namespaces: %s\n", strerror(errno));
    _exit(125);
  }
  if (hostname[0]) (void)sethostname(hostname, strlen(hostname));
  char self[4096];
  ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
  self[n > 0 ? n : 0] = '\0';
  int own = own_mounts(logfd);
  if (own < 0) {
    dprintf(logfd, "ferry: cannot set up the task's mounts: %s\n", strerror(errno));
    _exit(125);
  }
  if (own && n > 0) {
    // What was opened outside the namespace (our log, our own program and its libraries) is on
    // mounts CRIU cannot find in it: reopen the log here, and run ourselves again from here.
    int fd = open(logpath, O_WRONLY | O_APPEND);
    if (fd < 0 || dup2(fd, logfd) < 0) {
      dprintf(logfd, "ferry: cannot reopen %s: %s\n", logpath, strerror(errno));
      _exit(125);
    }
    close(fd);
    int argc = 0;
    while (argv[argc]) argc++;
    char **args = calloc((size_t)argc + 7, sizeof *args);
    char fdarg[16];
    snprintf(fdarg, sizeof fdarg, "%d", logfd);
    if (args) {
      const char *head[] = {self, "init", dir, cwd, fdarg, "--"};
      for (int i = 0; i < 6; i++) args[i] = (char *)head[i];
      for (int i = 0; i < argc; i++) args[6 + i] = argv[i];
      execv(self, args);
    }
    dprintf(logfd, "ferry: warning: cannot run %s again in the task's mount namespace (%s): it cannot be checkpointed\n", self, strerror(errno));
  }
  init_main(dir, cwd, logfd, argv);
}

static void init_main(const char *dir, const char *cwd, int logfd, char **argv) {
  pid_t c = fork();
  if (c < 0) _exit(125);
  if (c == 0) {
    int devnull = open("/dev/null", O_RDONLY);
    if (devnull < 0 || dup2(devnull, 0) < 0 || dup2(logfd, 1) < 0 || dup2(logfd, 2) < 0) _exit(125);
    close_from(3);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    signal(SIGPIPE, SIG_DFL);  // the shim ignores it; the command gets what a shell would give it
    if (cwd[0] && chdir(cwd) != 0) {
      fprintf(stderr, "ferry: cannot enter working directory %s: %s\n", cwd, strerror(errno));
      _exit(126);
    }
    execvp(argv[0], argv);
    fprintf(stderr, "ferry: cannot execute %s: %s\n", argv[0], strerror(errno));
    _exit(errno == ENOENT ? 127 : 126);
  }
  main_child = c;
  // CRIU's parasite mounts a proc of the task's PID namespace at ./proc.crtools of pid 1 while it
  // dumps: in a directory of this task's own, so that tasks dumped at once do not collide (at "/"
  // every concurrent dump but one failed with EEXIST). Where it cannot, Ferry queues such dumps
  // by the directory it is in: no reason to end the task.
  (void)!chdir(dir);
  // The init keeps no file of the host open: only /dev/null, so a checkpoint has nothing of ours
  // to describe.
  int devnull = open("/dev/null", O_RDWR);
  dup2(devnull, 0);
  dup2(devnull, 1);
  dup2(devnull, 2);
  close_from(3);
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = forward;
  // Not SIGCONT: Ferry resumes a restored tree with it, and a process the task had stopped must stay so.
  int sigs[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH};
  for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++) sigaction(sigs[i], &sa, NULL);
  // The task lives while any of its processes does: orphans (a daemon whose parent exited) are
  // ours as pid 1, so no child left means no process left. The task's status is the last one's.
  int last = 0;
  for (;;) {
    int st;
    pid_t p = waitpid(-1, &st, 0);
    if (p < 0) {
      if (errno == EINTR) continue;
      if (errno == ECHILD) break;
      _exit(125);
    }
    if (p == c) main_alive = 0;
    last = st;
  }
  if (WIFEXITED(last)) _exit(WEXITSTATUS(last));
  _exit(128 + WTERMSIG(last));
}

// ---- shim ---------------------------------------------------------------------------------------
static void write_exit(const char *dir, const char *inc, pid_t root, int st) {
  char tmp[4200], path[4096];
  snprintf(path, sizeof path, "%s/exit-%s.json", dir, inc);
  snprintf(tmp, sizeof tmp, "%s.tmp", path);
  FILE *f = fopen(tmp, "w");
  if (!f) return;
  if (WIFEXITED(st))
    fprintf(f, "{\"incarnation\":%s,\"pid\":%d,\"exitCode\":%d}\n", inc, (int)root, WEXITSTATUS(st));
  else
    fprintf(f, "{\"incarnation\":%s,\"pid\":%d,\"signal\":%d}\n", inc, (int)root, WTERMSIG(st));
  fflush(f);
  fsync(fileno(f));
  fclose(f);
  rename(tmp, path);
}

static int wait_root(const char *dir, const char *inc, pid_t root) {
  for (;;) {
    int st;
    pid_t p = waitpid(-1, &st, 0);
    if (p < 0) {
      if (errno == EINTR) continue;
      // The root is not our child (should not happen): we cannot learn its exit.
      return 1;
    }
    if (p == root) {
      write_exit(dir, inc, root, st);
      return 0;
    }
  }
}

static void detach_stdio(const char *dir) {
  char path[4096];
  snprintf(path, sizeof path, "%s/shim.log", dir);
  int devnull = open("/dev/null", O_RDONLY);
  int log = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
  if (devnull >= 0) dup2(devnull, 0);
  if (log >= 0) {
    dup2(log, 1);
    dup2(log, 2);
  }
  if (devnull > 2) close(devnull);
  if (log > 2) close(log);
}

/* A command from fd: arguments each ended by a NUL, up to end-of-file; NULL if there is none. */
static char **read_command(int fd) {
  static char buf[1 << 16];
  size_t len = 0;
  for (;;) {
    ssize_t n = read(fd, buf + len, sizeof buf - len);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    len += (size_t)n;
    if (len == sizeof buf) return NULL;
  }
  if (len == 0 || buf[len - 1] != '\0') return NULL;
  size_t argc = 0;
  for (size_t i = 0; i < len; i++) argc += buf[i] == '\0';
  char **out = calloc(argc + 1, sizeof *out);
  if (!out) return NULL;
  char *p = buf;
  for (size_t i = 0; i < argc; i++) {
    out[i] = p;
    p += strlen(p) + 1;
  }
  return out;
}

static int usage(void) {
  fprintf(stderr,
          "usage: ferry-shim run DIR INCARNATION HOSTNAME CWD -- CMD [ARGS...]\n"
          "       ferry-shim restore DIR INCARNATION PIDFILE -- CRIU-COMMAND...\n");
  return 2;
}

int main(int argc, char **argv) {
  if (argc < 2) return usage();
  // The task's init, run again inside the task's mount namespace (run_init).
  if (strcmp(argv[1], "init") == 0) {
    if (argc < 8 || strcmp(argv[5], "--") != 0) return usage();
    init_main(argv[2], argv[3], atoi(argv[4]), argv + 6);
    return 125;
  }
  int is_run = strcmp(argv[1], "run") == 0;
  int is_restore = strcmp(argv[1], "restore") == 0;
  int fixed = is_run ? 6 : 5;  // args up to and including "--"
  int gated = is_restore && getenv("FERRY_SHIM_GATE") != NULL;
  if ((!is_run && !is_restore) || argc < fixed + (gated ? 1 : 2) || strcmp(argv[fixed], "--") != 0) return usage();
  const char *dir = argv[2], *inc = argv[3];
  char **cmd = argv + fixed + 1;
  if (fcntl(status_fd, F_GETFD) < 0) status_fd = -1;
  else fcntl(status_fd, F_SETFD, FD_CLOEXEC);

  signal(SIGPIPE, SIG_IGN);
  setsid();
  if (prctl(PR_SET_CHILD_SUBREAPER, 1) != 0) {
    report("err cannot become child subreaper: %s", strerror(errno));
    return 1;
  }
  // Gated, the shim log is opened after the gate: the task's directory is still being synced.
  if (!gated) detach_stdio(dir);

  if (is_run) {
    const char *hostname = argv[4], *cwd = argv[5];
    char logpath[4096];
    snprintf(logpath, sizeof logpath, "%s/task.log", dir);
    int logfd = open(logpath, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640);
    if (logfd < 0) {
      report("err cannot open %s: %s", logpath, strerror(errno));
      return 1;
    }
    // New PID and time namespaces apply to our children: the init below is pid 1 and its clocks
    // can be carried to another host by CRIU without jumping.
    if (unshare(CLONE_NEWPID | CLONE_NEWTIME) != 0) {
      report("err cannot create PID/time namespaces: %s", strerror(errno));
      return 1;
    }
    pid_t root = fork();
    if (root < 0) {
      report("err fork: %s", strerror(errno));
      return 1;
    }
    if (root == 0) {
      int fl = fcntl(logfd, F_GETFD);
      fcntl(logfd, F_SETFD, fl & ~FD_CLOEXEC);
      run_init(dir, hostname, cwd, logpath, logfd, cmd);
    }
    close(logfd);
    report("ok %d", (int)root);
    return wait_root(dir, inc, root);
  }

  const char *pidfile = argv[4];
  if (gated) {
    cmd = read_command(4);
    close(4);
    if (!cmd) {
      report("err the restore was called off");
      return 1;
    }
    detach_stdio(dir);
  }
  pid_t criu = fork();
  if (criu < 0) {
    report("err fork: %s", strerror(errno));
    return 1;
  }
  if (criu == 0) {
    close_from(3);
    // CRIU finds the task's network namespace as an inherited fd 3 (--inherit-fd fd[3]:...).
    const char *ns = getenv("FERRY_NETNS");
    if (ns) {
      int fd = open(ns, O_RDONLY);
      if (fd < 0 || (fd != 3 && dup2(fd, 3) != 3)) {
        fprintf(stderr, "ferry-shim: cannot open %s: %s\n", ns, strerror(errno));
        _exit(127);
      }
    }
    execvp(cmd[0], cmd);
    fprintf(stderr, "ferry-shim: cannot execute %s: %s\n", cmd[0], strerror(errno));
    _exit(127);
  }
  int st;
  while (waitpid(criu, &st, 0) < 0) {
    if (errno != EINTR) {
      report("err waitpid: %s", strerror(errno));
      return 1;
    }
  }
  if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
    if (WIFEXITED(st)) report("err criu exited with code %d", WEXITSTATUS(st));
    else report("err criu killed by signal %d", WTERMSIG(st));
    return 1;
  }
  FILE *f = fopen(pidfile, "r");
  int root = 0;
  if (!f || fscanf(f, "%d", &root) != 1 || root <= 0) {
    report("err criu wrote no pid to %s", pidfile);
    if (f) fclose(f);
    return 1;
  }
  fclose(f);
  report("ok %d", root);
  return wait_root(dir, inc, (pid_t)root);
}
