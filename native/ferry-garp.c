// ferry-garp: announce that an address now lives behind this host (gratuitous ARP).
//
//   ferry-garp IFACE ADDRESS [COUNT] [INTERVAL_MS]
//
// After a task with its own address moved here, the neighbours' ARP caches still name the old
// host's MAC; an unsolicited ARP request (sender = target = ADDRESS, sender MAC = IFACE's) makes
// them update at once instead of after their entries go stale. Repeated, because Linux ignores
// an update within locktime (1 s) of the last one.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <netinet/if_ether.h>
#include <linux/if_packet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: ferry-garp IFACE ADDRESS [COUNT] [INTERVAL_MS]\n");
    return 2;
  }
  int count = argc > 3 ? atoi(argv[3]) : 3, interval = argc > 4 ? atoi(argv[4]) : 500;
  struct in_addr ip;
  if (inet_pton(AF_INET, argv[2], &ip) != 1) {
    fprintf(stderr, "ferry-garp: not an IPv4 address: %s\n", argv[2]);
    return 2;
  }
  int s = socket(AF_PACKET, SOCK_DGRAM, htons(ETH_P_ARP));
  if (s < 0) {
    perror("ferry-garp: socket");
    return 1;
  }
  struct ifreq ifr;
  memset(&ifr, 0, sizeof ifr);
  snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", argv[1]);
  if (ioctl(s, SIOCGIFHWADDR, &ifr) < 0) {
    fprintf(stderr, "ferry-garp: %s: %s\n", argv[1], strerror(errno));
    return 1;
  }
  struct ether_arp a;
  memset(&a, 0, sizeof a);
  a.arp_hrd = htons(ARPHRD_ETHER);
  a.arp_pro = htons(ETH_P_IP);
  a.arp_hln = ETH_ALEN;
  a.arp_pln = 4;
  a.arp_op = htons(ARPOP_REQUEST);
  memcpy(a.arp_sha, ifr.ifr_hwaddr.sa_data, ETH_ALEN);
  memcpy(a.arp_spa, &ip, 4);
  memcpy(a.arp_tpa, &ip, 4);
  struct sockaddr_ll to;
  memset(&to, 0, sizeof to);
  to.sll_family = AF_PACKET;
  to.sll_protocol = htons(ETH_P_ARP);
  to.sll_ifindex = (int)if_nametoindex(argv[1]);
  to.sll_halen = ETH_ALEN;
  memset(to.sll_addr, 0xff, ETH_ALEN);
  for (int i = 0; i < count; i++) {
    if (i) {
      struct timespec t = {interval / 1000, (long)(interval % 1000) * 1000000L};
      nanosleep(&t, NULL);
    }
    if (sendto(s, &a, sizeof a, 0, (struct sockaddr *)&to, sizeof to) < 0) {
      perror("ferry-garp: sendto");
      return 1;
    }
  }
  return 0;
}
