// ferry-sockets: a two-process task with a listening TCP socket, a pipe, a unix socket pair and
// an open log file, for Ferry's checkpoint tests.
//
//   ferry-sockets PORT LOGFILE
//
// For each TCP client line "X", the parent sends X through the pipe to its child, the child
// answers "pong X" on the socket pair, the parent returns that to the client and appends it to
// LOGFILE.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static ssize_t read_line(int fd, char *buf, size_t cap) {
  size_t n = 0;
  while (n + 1 < cap) {
    char c;
    ssize_t r = read(fd, &c, 1);
    if (r <= 0) return n ? (ssize_t)n : -1;
    if (c == '\n') break;
    buf[n++] = c;
  }
  buf[n] = 0;
  return (ssize_t)n;
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: ferry-sockets PORT LOGFILE\n");
    return 2;
  }
  int port = atoi(argv[1]);
  int p2c[2], sp[2];
  if (pipe(p2c) || socketpair(AF_UNIX, SOCK_STREAM, 0, sp)) {
    perror("ferry-sockets");
    return 1;
  }
  pid_t child = fork();
  if (child == 0) {
    close(p2c[1]);
    close(sp[0]);
    char line[256], out[300];
    for (;;) {
      if (read_line(p2c[0], line, sizeof line) < 0) _exit(0);
      int n = snprintf(out, sizeof out, "pong %s\n", line);
      if (write(sp[1], out, (size_t)n) != n) _exit(1);
    }
  }
  close(p2c[0]);
  close(sp[1]);
  int log = open(argv[2], O_WRONLY | O_CREAT | O_APPEND, 0644);
  int ls = socket(AF_INET, SOCK_STREAM, 0);
  int one = 1;
  setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  a.sin_addr.s_addr = htonl(INADDR_ANY);
  if (log < 0 || ls < 0 || bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 16)) {
    perror("ferry-sockets");
    return 1;
  }
  printf("listening %d\n", port);
  fflush(stdout);
  for (;;) {
    int c = accept(ls, NULL, NULL);
    if (c < 0) continue;
    char line[256], reply[300];
    if (read_line(c, line, sizeof line) >= 0) {
      size_t n = strlen(line);
      line[n] = '\n';
      if (write(p2c[1], line, n + 1) == (ssize_t)(n + 1) && read_line(sp[0], reply, sizeof reply - 1) >= 0) {
        size_t m = strlen(reply);
        reply[m] = '\n';
        (void)!write(c, reply, m + 1);
        (void)!write(log, reply, m + 1);
      }
    }
    close(c);
  }
}
