// ferry-rsh: rsync's "remote shell" for Ferry, in C so that no interpreter starts while a task
// is frozen. rsync runs `ferry-rsh SOCKET HOST rsync --server ...`; we send the command line
// (one JSON array of strings) over the source agent's unix socket, then copy stdin to the socket
// and the socket to stdout. The agent carries the bytes over the migration's one connection.
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static int write_all(int fd, const char *p, size_t n) {
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

static int put_json_string(int fd, const char *s) {
  char buf[8192];
  size_t n = 0;
  buf[n++] = '"';
  for (; *s; s++) {
    if (n + 8 >= sizeof buf) {
      if (write_all(fd, buf, n)) return -1;
      n = 0;
    }
    unsigned char c = (unsigned char)*s;
    if (c == '"' || c == '\\') {
      buf[n++] = '\\';
      buf[n++] = (char)c;
    } else if (c < 0x20) {
      n += (size_t)snprintf(buf + n, 8, "\\u%04x", c);
    } else {
      buf[n++] = (char)c;
    }
  }
  buf[n++] = '"';
  return write_all(fd, buf, n);
}

int main(int argc, char **argv) {
  if (argc < 4) {
    fprintf(stderr, "usage: ferry-rsh SOCKET HOST COMMAND...\n");
    return 2;
  }
  int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  struct sockaddr_un a = {.sun_family = AF_UNIX};
  if (strlen(argv[1]) >= sizeof a.sun_path) {
    fprintf(stderr, "ferry-rsh: socket path too long\n");
    return 12;
  }
  strcpy(a.sun_path, argv[1]);
  if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof a) != 0) {
    fprintf(stderr, "ferry-rsh: cannot reach the Ferry agent at %s: %s\n", argv[1], strerror(errno));
    return 12;
  }
  if (write_all(s, "[", 1)) return 12;
  for (int i = 3; i < argc; i++) {
    if ((i > 3 && write_all(s, ",", 1)) || put_json_string(s, argv[i])) return 12;
  }
  if (write_all(s, "]\n", 2)) return 12;

  char buf[65536];
  int in_open = 1;
  for (;;) {
    struct pollfd p[2] = {{.fd = in_open ? 0 : -1, .events = POLLIN}, {.fd = s, .events = POLLIN}};
    if (poll(p, 2, -1) < 0) {
      if (errno == EINTR) continue;
      return 12;
    }
    if (in_open && (p[0].revents & (POLLIN | POLLHUP))) {
      ssize_t r = read(0, buf, sizeof buf);
      if (r <= 0) {
        shutdown(s, SHUT_WR);
        in_open = 0;
      } else if (write_all(s, buf, (size_t)r)) {
        return 12;
      }
    }
    if (p[1].revents & (POLLIN | POLLHUP | POLLERR)) {
      ssize_t r = read(s, buf, sizeof buf);
      if (r <= 0) return 0;
      if (write_all(1, buf, (size_t)r)) return 12;
    }
  }
}
