/* A slow disk for one directory, as an LD_PRELOAD shim: every write(2) or writev(2) to a
 * regular file under $SLOW_WRITE_DIR sleeps $SLOW_WRITE_US microseconds and writes at most 64 KiB, so the
 * directory takes at most ~64 KiB per sleep. Everything else (sockets, other files) goes
 * straight to the real write. A real disk cannot be made slow on demand here (no
 * device-mapper in this kernel), and the faults rule allows a fake for a slow disk; this one
 * leaves the gateway's binary and its file-writing code exactly as shipped. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define MAX_WRITE (64 * 1024)

static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_writev)(int, const struct iovec *, int);

static int slowed(int fd) {
    const char *dir = getenv("SLOW_WRITE_DIR");
    struct stat st;
    if (!dir || fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) return 0;
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n <= 0) return 0;
    path[n] = 0;
    return strncmp(path, dir, strlen(dir)) == 0;
}

ssize_t write(int fd, const void *buf, size_t count) {
    if (!real_write) real_write = (ssize_t (*)(int, const void *, size_t))dlsym(RTLD_NEXT, "write");
    if (slowed(fd)) {
        const char *us = getenv("SLOW_WRITE_US");
        long delay = us ? atol(us) : 20000;
        struct timespec ts = {delay / 1000000, (delay % 1000000) * 1000};
        nanosleep(&ts, NULL);
        if (count > MAX_WRITE) count = MAX_WRITE;
    }
    return real_write(fd, buf, count);
}

/* A short write is legal for writev too: a slowed one writes (part of) its first non-empty
 * buffer through the slowed write above. */
ssize_t writev(int fd, const struct iovec *iov, int iovcnt) {
    if (!real_writev)
        real_writev = (ssize_t (*)(int, const struct iovec *, int))dlsym(RTLD_NEXT, "writev");
    if (slowed(fd)) {
        for (int i = 0; i < iovcnt; i++)
            if (iov[i].iov_len > 0) return write(fd, iov[i].iov_base, iov[i].iov_len);
        return 0;
    }
    return real_writev(fd, iov, iovcnt);
}
