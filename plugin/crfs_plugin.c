/* crfs.so: fuse-overlayfs data-source plugin (initial skeleton; grows into the IPC client). */
#define _GNU_SOURCE
#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <dirent.h>
#include <msgpack.h>

#define EXPORT __attribute__((visibility("default")))

struct ovl_layer;

struct data_source {
  int (*num_of_layers)(const char *opaque, const char *path);
  int (*load_data_source)(struct ovl_layer *l, const char *opaque, const char *path, int n_layer);
  int (*cleanup)(struct ovl_layer *l);
  int (*file_exists)(struct ovl_layer *l, const char *pathname);
  int (*statat)(struct ovl_layer *l, const char *path, struct stat *st, int flags, unsigned int mask);
  int (*fstat)(struct ovl_layer *l, int fd, const char *path, unsigned int mask, struct stat *st);
  void *(*opendir)(struct ovl_layer *l, const char *path);
  struct dirent *(*readdir)(void *dirp);
  int (*closedir)(void *dirp);
  int (*openat)(struct ovl_layer *l, const char *path, int flags, mode_t mode);
  int (*listxattr)(struct ovl_layer *l, const char *path, char *buf, size_t size);
  int (*getxattr)(struct ovl_layer *l, const char *path, const char *name, char *buf, size_t size);
  ssize_t (*readlinkat)(struct ovl_layer *l, const char *path, char *buf, size_t bufsiz);
  bool (*support_acls)(struct ovl_layer *l);
};

static int crfs_num_of_layers(const char *o, const char *p) { (void)o; (void)p; errno = ENOSYS; return -1; }
static int crfs_load(struct ovl_layer *l, const char *o, const char *p, int n) { (void)l; (void)o; (void)p; (void)n; errno = ENOSYS; return -1; }
static int crfs_cleanup(struct ovl_layer *l) { (void)l; return 0; }
static int crfs_file_exists(struct ovl_layer *l, const char *p) { (void)l; (void)p; errno = ENOSYS; return -1; }
static int crfs_statat(struct ovl_layer *l, const char *p, struct stat *st, int f, unsigned int m) { (void)l; (void)p; (void)st; (void)f; (void)m; errno = ENOSYS; return -1; }
static int crfs_fstat(struct ovl_layer *l, int fd, const char *p, unsigned int m, struct stat *st) { (void)l; (void)fd; (void)p; (void)m; (void)st; errno = ENOSYS; return -1; }
static void *crfs_opendir(struct ovl_layer *l, const char *p) { (void)l; (void)p; errno = ENOSYS; return NULL; }
static struct dirent *crfs_readdir(void *d) { return readdir(d); }
static int crfs_closedir(void *d) { return closedir(d); }
static int crfs_openat(struct ovl_layer *l, const char *p, int f, mode_t m) { (void)l; (void)p; (void)f; (void)m; errno = ENOSYS; return -1; }
static int crfs_listxattr(struct ovl_layer *l, const char *p, char *b, size_t s) { (void)l; (void)p; (void)b; (void)s; errno = ENOSYS; return -1; }
static int crfs_getxattr(struct ovl_layer *l, const char *p, const char *n, char *b, size_t s) { (void)l; (void)p; (void)n; (void)b; (void)s; errno = ENOSYS; return -1; }
static ssize_t crfs_readlinkat(struct ovl_layer *l, const char *p, char *b, size_t s) { (void)l; (void)p; (void)b; (void)s; errno = ENOSYS; return -1; }
static bool crfs_support_acls(struct ovl_layer *l) { (void)l; return false; }

static struct data_source crfs_ds = {
  crfs_num_of_layers, crfs_load, crfs_cleanup, crfs_file_exists, crfs_statat, crfs_fstat,
  crfs_opendir, crfs_readdir, crfs_closedir, crfs_openat, crfs_listxattr, crfs_getxattr,
  crfs_readlinkat, crfs_support_acls,
};

EXPORT int plugin_version(void) { return 1; }
EXPORT const char *plugin_name(void) { return "crfs"; }
EXPORT struct data_source *plugin_load(const char *opaque, const char *path) { (void)opaque; (void)path; return &crfs_ds; }
EXPORT int plugin_release(void) { return 0; }
