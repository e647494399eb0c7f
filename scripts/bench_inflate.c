/* Inflate and CRC-32 of whole members with zlib and with libdeflate, the two inflaters
 * Debian packages for the native engine (see scripts/bench_inflate.py, which builds the
 * members and this program). Each timed loop does only what it compares; best of REPEATS.
 *
 *   bench_inflate MEMBERS INDEX   (INDEX: per member u64 offset, deflated size, size, crc) */
#include <libdeflate.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zlib.h>

enum { REPEATS = 7 };

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static unsigned char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f || fseek(f, 0, SEEK_END) || (*len = (size_t)ftell(f), fseek(f, 0, SEEK_SET)))
        return NULL;
    unsigned char *buf = malloc(*len);
    if (buf && fread(buf, 1, *len, f) != *len)
        buf = NULL;
    fclose(f);
    return buf;
}

int main(int argc, char **argv)
{
    size_t data_len, index_len;
    unsigned char *data = argc == 3 ? slurp(argv[1], &data_len) : NULL;
    uint64_t *index = argc == 3 ? (uint64_t *)slurp(argv[2], &index_len) : NULL;
    if (!data || !index)
        return fprintf(stderr, "usage: bench_inflate MEMBERS INDEX\n"), 2;
    size_t n = index_len / 32, biggest = 0, total = 0;
    for (size_t i = 0; i < n; i++) {
        biggest = index[4 * i + 2] > biggest ? index[4 * i + 2] : biggest;
        total += index[4 * i + 2];
    }
    unsigned char *out = malloc(biggest);
    struct libdeflate_decompressor *d = libdeflate_alloc_decompressor();
    double zlib_best = 1e30, libdeflate_best = 1e30, zcrc_best = 1e30, lcrc_best = 1e30;
    uint32_t sink = 0;
    for (int r = 0; r < REPEATS; r++) {
        double t = now();
        for (size_t i = 0; i < n; i++) {
            z_stream z;
            memset(&z, 0, sizeof z);
            inflateInit2(&z, -15);
            z.next_in = data + index[4 * i];
            z.avail_in = (uInt)index[4 * i + 1];
            z.next_out = out;
            z.avail_out = (uInt)index[4 * i + 2];
            if (inflate(&z, Z_FINISH) != Z_STREAM_END)
                return fprintf(stderr, "zlib: member %zu\n", i), 1;
            inflateEnd(&z);
        }
        zlib_best = now() - t < zlib_best ? now() - t : zlib_best;
        t = now();
        for (size_t i = 0; i < n; i++) {
            size_t used, made;
            if (libdeflate_deflate_decompress_ex(d, data + index[4 * i], index[4 * i + 1], out, index[4 * i + 2],
                                                 &used, &made) != LIBDEFLATE_SUCCESS)
                return fprintf(stderr, "libdeflate: member %zu\n", i), 1;
        }
        libdeflate_best = now() - t < libdeflate_best ? now() - t : libdeflate_best;
        t = now();
        for (size_t i = 0; i < n; i++)
            sink ^= (uint32_t)crc32(0, data + index[4 * i], (uInt)index[4 * i + 1]);
        zcrc_best = now() - t < zcrc_best ? now() - t : zcrc_best;
        t = now();
        for (size_t i = 0; i < n; i++)
            sink ^= libdeflate_crc32(0, data + index[4 * i], index[4 * i + 1]);
        lcrc_best = now() - t < lcrc_best ? now() - t : lcrc_best;
    }
    printf("{\"members\": %zu, \"bytes\": %zu, \"zlib_inflate\": %.6f, \"libdeflate_inflate\": %.6f, "
           "\"zlib_crc32\": %.6f, \"libdeflate_crc32\": %.6f, \"sink\": %u}\n",
           n, total, zlib_best, libdeflate_best, zcrc_best, lcrc_best, sink);
    return 0;
}
