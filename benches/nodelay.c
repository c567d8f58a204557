/* LD_PRELOAD shim: turns TCP_NODELAY on for every TCP socket a process connects or accepts, so a
 * program that leaves Nagle's algorithm on (the reference node) can be measured without it. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

static void nodelay(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one); /* fails harmlessly on non-TCP */
}

int connect(int fd, const struct sockaddr *addr, socklen_t len) {
    int (*real)(int, const struct sockaddr *, socklen_t) = dlsym(RTLD_NEXT, "connect");
    int rc = real(fd, addr, len);
    nodelay(fd);
    return rc;
}

int accept(int fd, struct sockaddr *addr, socklen_t *len) {
    int (*real)(int, struct sockaddr *, socklen_t *) = dlsym(RTLD_NEXT, "accept");
    int rc = real(fd, addr, len);
    if (rc >= 0) nodelay(rc);
    return rc;
}

int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags) {
    int (*real)(int, struct sockaddr *, socklen_t *, int) = dlsym(RTLD_NEXT, "accept4");
    int rc = real(fd, addr, len, flags);
    if (rc >= 0) nodelay(rc);
    return rc;
}
