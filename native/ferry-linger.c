// ferry-linger: sets or clears SO_LINGER {on, 0 s} on the socket at fd 3 (shared with the agent).
//
//   ferry-linger on|off
//
// With it on, the socket's last close (also the agent's death) resets the connection instead of
// ending it cleanly. CRIU's lazy page server reads a clean end between two requests as "every
// page delivered" and ends the task; a reset is an error, after which it lets the task run on.
// Node has no setsockopt for SO_LINGER, so the agent hands its socket to this helper.
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

int main(int argc, char **argv) {
  if (argc != 2 || (strcmp(argv[1], "on") && strcmp(argv[1], "off"))) {
    fprintf(stderr, "usage: ferry-linger on|off (the socket at fd 3)\n");
    return 2;
  }
  struct linger l = {.l_onoff = !strcmp(argv[1], "on"), .l_linger = 0};
  if (setsockopt(3, SOL_SOCKET, SO_LINGER, &l, sizeof(l))) {
    fprintf(stderr, "ferry-linger: setsockopt(SO_LINGER) on fd 3: %s\n", strerror(errno));
    return 1;
  }
  return 0;
}
