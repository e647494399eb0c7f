/* A benchmark's stand-in for a network file system (bench_loader.py --store-latency-ms):
 * a read-only view of one folder whose every read first waits a fixed time, as a round
 * trip to a file server would. Not part of bioscanfs.
 *
 * Why: on a cluster the zips sit on NFS, Lustre or GPFS, where a read that misses the
 * client's cache costs milliseconds, not a local disk's tens of microseconds; what then
 * bounds a loader is how many reads a mount keeps in flight, which a local disk never
 * shows. The kernel caches the view's pages as an NFS client would, so a pass after the
 * caches are dropped pays the wait and a warm one does not. Requests are answered on up
 * to STORE_THREADS threads and the kernel may send as many reads at once, far more than
 * any reader count measured, so the store itself never bounds the concurrency.
 *
 *   STORE_FOLDER=/data STORE_LATENCY_US=5000 bench_store MOUNTPOINT
 *
 * Returns once mounted (in the background); unmount with fusermount3 -u MOUNTPOINT.
 */
#define FUSE_USE_VERSION 312
#include <fuse.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define STORE_THREADS 256

static const char *folder;
static long latency_us;

/* The path under the folder, or ENAMETOOLONG. */
static int full_path(const char *path, char out[PATH_MAX])
{
    int n = snprintf(out, PATH_MAX, "%s%s", folder, path);
    return n < 0 || n >= PATH_MAX ? -ENAMETOOLONG : 0;
}

static int store_getattr(const char *path, struct stat *st, struct fuse_file_info *fi)
{
    (void)fi;
    char full[PATH_MAX];
    int err = full_path(path, full);
    return err ? err : lstat(full, st) ? -errno : 0;
}

static int store_readdir(const char *path, void *buf, fuse_fill_dir_t fill, off_t offset,
                         struct fuse_file_info *fi, enum fuse_readdir_flags flags)
{
    (void)offset; (void)fi; (void)flags;
    char full[PATH_MAX];
    int err = full_path(path, full);
    DIR *dir = err ? NULL : opendir(full);
    if (!dir)
        return err ? err : -errno;
    for (struct dirent *entry; (entry = readdir(dir));)
        fill(buf, entry->d_name, NULL, 0, 0);
    closedir(dir);
    return 0;
}

static int store_open(const char *path, struct fuse_file_info *fi)
{
    char full[PATH_MAX];
    int err = full_path(path, full);
    int fd = err ? -1 : open(full, O_RDONLY);
    if (fd < 0)
        return err ? err : -errno;
    fi->fh = (uint64_t)fd;
    fi->keep_cache = 1;
    return 0;
}

static int store_read(const char *path, char *buf, size_t size, off_t offset, struct fuse_file_info *fi)
{
    (void)path;
    struct timespec wait = {latency_us / 1000000, (latency_us % 1000000) * 1000};
    while (nanosleep(&wait, &wait) != 0 && errno == EINTR)
        ;
    ssize_t n = pread((int)fi->fh, buf, size, offset);
    return n < 0 ? -errno : (int)n;
}

static int store_release(const char *path, struct fuse_file_info *fi)
{
    (void)path;
    close((int)fi->fh);
    return 0;
}

static void *store_init(struct fuse_conn_info *conn, struct fuse_config *cfg)
{
    conn->max_background = STORE_THREADS;
    conn->congestion_threshold = STORE_THREADS;
    cfg->kernel_cache = 1;
    return NULL;
}

static const struct fuse_operations OPS = {
    .getattr = store_getattr, .readdir = store_readdir, .open = store_open, .read = store_read,
    .release = store_release, .init = store_init,
};

int main(int argc, char *argv[])
{
    folder = getenv("STORE_FOLDER");
    const char *latency = getenv("STORE_LATENCY_US");
    if (argc != 2 || !folder || !latency || (latency_us = atol(latency)) < 0) {
        fprintf(stderr, "usage: STORE_FOLDER=DIR STORE_LATENCY_US=N %s MOUNTPOINT\n", argv[0]);
        return 2;
    }
    char threads[64];
    snprintf(threads, sizeof threads, "ro,max_threads=%d", STORE_THREADS);
    char *args[] = {argv[0], argv[1], "-o", threads, NULL};
    return fuse_main(4, args, &OPS, NULL);
}
