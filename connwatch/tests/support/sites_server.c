/* A TCP server with one leaking handler and its polite twin, for the leak-site
 * tests: a connection whose first byte is 'L' is read to EOF by leaky_handler, which
 * never closes it (CLOSE_WAIT for good); any other is read to EOF by polite_handler,
 * which closes it. Only leaky_handler may be named as a leak site. Prints its port
 * and serves one connection at a time until killed. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <sys/socket.h>
#include <unistd.h>

__attribute__((noinline)) static void leaky_handler(int fd) {
    char buf[512];
    while (read(fd, buf, sizeof buf) > 0) {
    }
    /* forgets close(fd) */
}

__attribute__((noinline)) static void polite_handler(int fd) {
    char buf[512];
    while (read(fd, buf, sizeof buf) > 0) {
    }
    close(fd);
}

int main(void) {
    int l = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 128) ||
        getsockname(l, (struct sockaddr *)&a, &len)) {
        perror("sites_server");
        return 1;
    }
    printf("%d\n", ntohs(a.sin_port));
    fflush(stdout);
    for (;;) {
        int c = accept(l, NULL, NULL);
        char kind;
        if (c < 0)
            continue;
        if (read(c, &kind, 1) != 1) {
            close(c);
            continue;
        }
        if (kind == 'L')
            leaky_handler(c);
        else
            polite_handler(c);
    }
}
