/* crfs.so: a fuse-overlayfs (C, 1.10 to 1.16) data-source plugin for lazily fetched layers.
 *
 * Lower syntax:   //crfs/KEY//ABSDIR
 *   KEY names one layer or a whole image registered with the crfs worker (`crfs lowerdir`
 *   writes it); it may contain no ':', ',' or '/'. An image KEY expands into its layers,
 *   uppermost first. ABSDIR is kept as the layer's path (for messages) and is not read.
 *
 * The crfs worker answers over a Unix stream socket: frames are a 4-byte big-endian length
 * and a msgpack map (libmsgpack-c); file descriptors come back with SCM_RIGHTS. The
 * protocol is described in crfs_worker/ipc.py. Each layer's l->fd is a directory fd on
 * the worker's read-only FUSE view of that layer. Three shortcuts keep round trips rare:
 * - metadata (statat, file_exists, xattr names) comes from whole-directory listings,
 *   fetched once per directory and layer and kept (layers never change), and symlink
 *   targets, once read, are kept with them;
 * - listings of subdirectories, and the targets of a directory's other symlinks, are
 *   asked for ahead on a second connection, so that a walk rarely waits for them (see
 *   "Listing ahead");
 * - opens that fetch nothing (O_NONBLOCK lookups, O_DIRECTORY, O_PATH, opendir) are
 *   done here with openat2 on l->fd, refusing symlinks and anything outside the layer.
 *   Opens for reading data go to the worker, which may hand out a verified file from
 *   its content cache instead.
 *
 * Environment (read by the plugin inside fuse-overlayfs):
 *   CRFS_RUNTIME_DIR   directory of worker.sock; else $XDG_RUNTIME_DIR/crfs; else
 *                      /tmp/crfs-UID (the same rule as crfs_worker/dirs.py). The
 *                      directory must belong to us and be closed to others.
 *   CRFS_WORKER_CMD    the worker command, split on blanks, no shell (e.g.
 *                      "/usr/bin/python3 -m crfs_worker.worker"). Default: the build-time
 *                      CRFS_DEFAULT_WORKER_CMD (`make WORKER_CMD=...`), normally "crfs worker",
 *                      looked up in PATH. It is started only when no worker answers,
 *                      detached (double fork, setsid, stdio on /dev/null, no other fds).
 *   CRFS_WORKER_START_TIMEOUT  seconds to wait for a started worker (default 30).
 *   CRFS_BACKGROUND_FETCH, CRFS_FETCH_ATTEMPTS, CRFS_FETCH_DEADLINE, CRFS_CACHE_DIR
 *                      not read here: a worker this plugin starts inherits the whole
 *                      environment and honours them (background fetch on/off, the retry
 *                      bound of registry requests, where the chunk store lives).
 *   CRFS_LIST_AHEAD    look-ahead requests in flight (default 32; 0 turns it off).
 *   CRFS_PLUGIN_LOG    if set, a file that gets one line per call (for tracing).
 *
 * Errors follow libc conventions: -1 (or NULL) with errno. A lost worker is reconnected
 * (and restarted) once per call; the layers' root fds are then replaced in place (dup3).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <linux/openat2.h>
#include <msgpack.h>

#define EXPORT __attribute__ ((visibility ("default")))

#ifndef CRFS_DEFAULT_WORKER_CMD
#define CRFS_DEFAULT_WORKER_CMD "crfs worker"
#endif

#define CRFS_PROTOCOL_VERSION 1
#define CRFS_MAX_FRAME (64u << 20)
#define CRFS_MAX_ARGS 32
#define CRFS_MAX_FDS_PER_MSG 4

/* ---- The ABI, re-declared from the verified facts (no header is installed). ---- */

struct data_source;

struct ovl_layer
{
  struct ovl_layer *next;
  struct data_source *ds;
  void *ovl_data; /* private to fuse-overlayfs */
  char *path;     /* malloc'd, freed by fuse-overlayfs */
  int fd;         /* O_DIRECTORY, closed by fuse-overlayfs */
  bool low;
  void *data_source_private_data;
  int stat_override_mode;
};

_Static_assert (offsetof (struct ovl_layer, ds) == 8, "ovl_layer.ds");
_Static_assert (offsetof (struct ovl_layer, path) == 24, "ovl_layer.path");
_Static_assert (offsetof (struct ovl_layer, fd) == 32, "ovl_layer.fd");
_Static_assert (offsetof (struct ovl_layer, low) == 36, "ovl_layer.low");
_Static_assert (offsetof (struct ovl_layer, data_source_private_data) == 40, "ovl_layer.private");
_Static_assert (sizeof (struct ovl_layer) == 56, "ovl_layer size");

struct data_source
{
  int (*num_of_layers) (const char *opaque, const char *path);
  int (*load_data_source) (struct ovl_layer *l, const char *opaque, const char *path, int n_layer);
  int (*cleanup) (struct ovl_layer *l);
  int (*file_exists) (struct ovl_layer *l, const char *pathname);
  int (*statat) (struct ovl_layer *l, const char *path, struct stat *st, int flags, unsigned int mask);
  int (*fstat) (struct ovl_layer *l, int fd, const char *path, unsigned int mask, struct stat *st);
  void *(*opendir) (struct ovl_layer *l, const char *path);
  struct dirent *(*readdir) (void *dirp);
  int (*closedir) (void *dirp);
  int (*openat) (struct ovl_layer *l, const char *path, int flags, mode_t mode);
  int (*listxattr) (struct ovl_layer *l, const char *path, char *buf, size_t size);
  int (*getxattr) (struct ovl_layer *l, const char *path, const char *name, char *buf, size_t size);
  ssize_t (*readlinkat) (struct ovl_layer *l, const char *path, char *buf, size_t bufsiz);
  bool (*support_acls) (struct ovl_layer *l); /* read by 1.11+ only */
};

/* ---- Plugin state. fuse-overlayfs gives us no context pointer before load, so the
 * connection lives in one process-wide struct, guarded by a mutex (threaded=1). ---- */

#define CRFS_STAT_FIELDS 9 /* ino mode nlink uid gid size mtime_ns rdev_major rdev_minor */
#define CRFS_CACHE_BUCKETS 1024
#define CRFS_CACHE_MAX_ENTRIES 262144

/* One entry of a cached directory listing. Layers never change, so nothing expires. */
struct cached_entry
{
  char *name;
  uint64_t st[CRFS_STAT_FIELDS];
  char *xattr_names; /* NUL-terminated names back to back, or NULL */
  uint32_t xattr_len;
  uint32_t target_len;
  char *target; /* a symlink's target once read (not NUL-terminated), or NULL */
};

struct cached_dir
{
  struct cached_dir *next; /* hash chain */
  char *path;
  int error; /* 0, or ENOENT/ENOTDIR: no such directory in this layer */
  size_t count;
  struct cached_entry *entries; /* sorted by name */
  bool ahead_done;              /* its subdirectories were asked for ahead (once) */
};

struct crfs_layer
{
  struct crfs_layer *next;
  struct ovl_layer *ovl;
  uint64_t num; /* the worker's layer number */
  dev_t dev;    /* st_dev of the layer's root fd, reported by statat */
  bool have_root;
  struct cached_entry root; /* the layer's root directory itself */
  struct cached_dir *dirs[CRFS_CACHE_BUCKETS];
  size_t cached_entries;
  size_t target_bytes; /* of the symlink targets kept with the listings */
};

#define CRFS_AHEAD_DEFAULT 32 /* look-ahead `list` and `readlink` requests in flight (ahead_send) */
#define CRFS_AHEAD_MAX 64
#define CRFS_AHEAD_WANTED 1024 /* directories remembered for the look-ahead */
/* Symlink targets are read ahead while a layer keeps fewer bytes of them than this: a
 * TOC may hold many symlinks of 4 KiB, and one read must not pull in all of them. */
#define CRFS_AHEAD_TARGET_BYTES (8u << 20)
#define CRFS_SKB_OVERHEAD 1024 /* the kernel's bookkeeping per message, above its bytes */

/* What to ask for ahead (asked for, or wanted): a directory's listing, or a symlink's
 * target. */
struct ahead_item
{
  struct crfs_layer *cl; /* NULL once its layer is cleaned up */
  char *path;
  bool link;   /* readlink, not list */
  size_t cost; /* of its request in the send buffer, while unread */
};

/* A directory stream answered from the cached listing (see crfs_opendir). */
struct listing_stream
{
  struct listing_stream *next;
  DIR *dir; /* what fuse-overlayfs holds: a real DIR * on an O_PATH fd, never read */
  struct crfs_layer *cl;
  char *path; /* normalised */
  size_t pos;
  struct dirent ent; /* valid until the next readdir or closedir */
};

struct crfs_state
{
  pthread_mutex_t cache_lock; /* taken before lock, never after */
  pthread_mutex_t lock;
  int sock;
  struct crfs_layer *layers;
  bool stale_fds; /* the connection broke: root fds may point at a dead view */
  /* Under cache_lock: listing ahead (see ahead_send). The requests in flight on
   * ahead_sock, oldest first (a ring), and the wanted directories (a stack in a ring). */
  int ahead_sock;
  int ahead_depth;  /* CRFS_LIST_AHEAD, -1 until read */
  size_t ahead_room;  /* bytes of requests the send buffer takes unread (ahead_connect) */
  size_t ahead_bytes; /* what the requests in flight cost of it */
  struct ahead_item ahead[CRFS_AHEAD_MAX];
  size_t ahead_first, ahead_count;
  struct ahead_item wanted[CRFS_AHEAD_WANTED];
  size_t wanted_next, wanted_count;
  FILE *log;
  bool log_checked;
  /* Under cache_lock: the open listing streams, and whether the call just before was
   * load_dir's statat(STATX_TYPE) of a directory (dir_probe_path in dir_probe_layer). */
  struct listing_stream *streams;
  int dead_dir; /* an fd of a removed directory: getdents on it fails with ENOENT */
  bool dir_probe;
  struct ovl_layer *dir_probe_layer;
  char dir_probe_path[PATH_MAX];
};

static struct crfs_state state = {
  .cache_lock = PTHREAD_MUTEX_INITIALIZER,
  .lock = PTHREAD_MUTEX_INITIALIZER,
  .sock = -1,
  .ahead_sock = -1,
  .ahead_depth = -1,
  .dead_dir = -1,
};

static void
trace (const char *fmt, ...)
{
  va_list ap;

  if (! state.log_checked)
    {
      const char *p = getenv ("CRFS_PLUGIN_LOG");
      state.log_checked = true;
      if (p && *p)
        state.log = fopen (p, "ae");
    }
  if (state.log == NULL)
    return;
  va_start (ap, fmt);
  vfprintf (state.log, fmt, ap);
  va_end (ap);
  fputc ('\n', state.log);
  fflush (state.log);
}

/* ---- Requests: a msgpack map {"op": OP, ...}, framed with a 4-byte length. ---- */

struct request
{
  msgpack_sbuffer sb;
  msgpack_packer pk;
  int failed;
};

static void
req_key (struct request *q, const char *key)
{
  q->failed |= msgpack_pack_str (&q->pk, strlen (key));
  q->failed |= msgpack_pack_str_body (&q->pk, key, strlen (key));
}

static void
req_str (struct request *q, const char *key, const char *v)
{
  req_key (q, key);
  q->failed |= msgpack_pack_str (&q->pk, strlen (v));
  q->failed |= msgpack_pack_str_body (&q->pk, v, strlen (v));
}

static void
req_begin (struct request *q, const char *op, size_t nargs)
{
  static const char header[4] = { 0, 0, 0, 0 };

  q->failed = 0;
  msgpack_sbuffer_init (&q->sb);
  msgpack_packer_init (&q->pk, &q->sb, msgpack_sbuffer_write);
  q->failed |= msgpack_sbuffer_write (&q->sb, header, sizeof (header));
  q->failed |= msgpack_pack_map (&q->pk, nargs + 1);
  req_str (q, "op", op);
}

static void
req_uint (struct request *q, const char *key, uint64_t v)
{
  req_key (q, key);
  q->failed |= msgpack_pack_uint64 (&q->pk, v);
}

static void
req_int (struct request *q, const char *key, int64_t v)
{
  req_key (q, key);
  q->failed |= msgpack_pack_int64 (&q->pk, v);
}

/* Paths and xattr names go as bin: they are bytes, not necessarily UTF-8. */
static void
req_bin (struct request *q, const char *key, const char *v)
{
  req_key (q, key);
  q->failed |= msgpack_pack_bin (&q->pk, strlen (v));
  q->failed |= msgpack_pack_bin_body (&q->pk, v, strlen (v));
}

static void
req_free (struct request *q)
{
  msgpack_sbuffer_destroy (&q->sb);
}

/* ---- Replies: {"err": 0 | errno, "msg": ..., fields...}, maybe with one fd. ---- */

struct reply
{
  char *buf;
  size_t len;
  msgpack_unpacked up;
  const msgpack_object *map;
  int fd;
};

static void
reply_init (struct reply *r)
{
  r->buf = NULL;
  r->len = 0;
  msgpack_unpacked_init (&r->up);
  r->map = NULL;
  r->fd = -1;
}

static void
reply_free (struct reply *r)
{
  msgpack_unpacked_destroy (&r->up);
  free (r->buf);
  r->buf = NULL;
  if (r->fd >= 0)
    close (r->fd);
  r->fd = -1;
}

/* Takes the fd out of the reply, so reply_free does not close it. */
static int
reply_take_fd (struct reply *r)
{
  int fd = r->fd;
  r->fd = -1;
  return fd;
}

static const msgpack_object *
reply_get (const struct reply *r, const char *key)
{
  size_t klen = strlen (key);
  uint32_t i;

  if (r->map == NULL)
    return NULL;
  for (i = 0; i < r->map->via.map.size; i++)
    {
      const msgpack_object_kv *kv = &r->map->via.map.ptr[i];
      if (kv->key.type == MSGPACK_OBJECT_STR && kv->key.via.str.size == klen
          && memcmp (kv->key.via.str.ptr, key, klen) == 0)
        return &kv->val;
    }
  return NULL;
}

static bool
reply_uint (const struct reply *r, const char *key, uint64_t *out)
{
  const msgpack_object *o = reply_get (r, key);
  if (o == NULL || o->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
    return false;
  *out = o->via.u64;
  return true;
}

/* A bin or str field: pointer into the reply buffer, not NUL-terminated. */
static bool
reply_bytes (const struct reply *r, const char *key, const char **ptr, uint32_t *len)
{
  const msgpack_object *o = reply_get (r, key);
  if (o == NULL)
    return false;
  if (o->type == MSGPACK_OBJECT_BIN)
    {
      *ptr = o->via.bin.ptr;
      *len = o->via.bin.size;
      return true;
    }
  if (o->type == MSGPACK_OBJECT_STR)
    {
      *ptr = o->via.str.ptr;
      *len = o->via.str.size;
      return true;
    }
  return false;
}

/* Load-time failures go to stderr (fuse-overlayfs' caller sees it), with the worker's
 * own explanation when it gave one. */
static void
report_failure (const char *what, const char *subject, const struct reply *r, int err)
{
  const char *msg = NULL;
  uint32_t len = 0;

  if (r != NULL && r->map != NULL && reply_bytes (r, "msg", &msg, &len) && len > 0)
    fprintf (stderr, "crfs: %s %s: %.*s\n", what, subject, (int) len, msg);
  else
    fprintf (stderr, "crfs: %s %s: %s\n", what, subject, strerror (err));
}

/* ---- Transport ---- */

static int
send_all (int fd, const char *buf, size_t len)
{
  while (len > 0)
    {
      /* MSG_NOSIGNAL: a dead worker must not kill fuse-overlayfs with SIGPIPE. */
      ssize_t n = send (fd, buf, len, MSG_NOSIGNAL);
      if (n < 0)
        {
          if (errno == EINTR)
            continue;
          return -1;
        }
      buf += n;
      len -= (size_t) n;
    }
  return 0;
}

static void
keep_received_fds (struct msghdr *msg, int *fd_out)
{
  struct cmsghdr *c;

  for (c = CMSG_FIRSTHDR (msg); c != NULL; c = CMSG_NXTHDR (msg, c))
    {
      size_t i, n;
      int fds[CRFS_MAX_FDS_PER_MSG];

      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
        continue;
      n = (c->cmsg_len - CMSG_LEN (0)) / sizeof (int);
      if (n > CRFS_MAX_FDS_PER_MSG)
        n = CRFS_MAX_FDS_PER_MSG;
      memcpy (fds, CMSG_DATA (c), n * sizeof (int));
      for (i = 0; i < n; i++)
        {
          /* One fd per reply is the protocol; anything extra is closed, never leaked. */
          if (*fd_out < 0)
            *fd_out = fds[i];
          else
            close (fds[i]);
        }
    }
}

/* Reads exactly len bytes, collecting any fd that rides along. */
static int
recv_exact (int sock, char *buf, size_t len, int *fd_out)
{
  while (len > 0)
    {
      union
      {
        char buf[CMSG_SPACE (sizeof (int) * CRFS_MAX_FDS_PER_MSG)];
        struct cmsghdr align;
      } control;
      struct iovec iov = { buf, len };
      struct msghdr msg;
      ssize_t n;

      memset (&msg, 0, sizeof (msg));
      msg.msg_iov = &iov;
      msg.msg_iovlen = 1;
      msg.msg_control = control.buf;
      msg.msg_controllen = sizeof (control.buf);
      n = recvmsg (sock, &msg, MSG_CMSG_CLOEXEC);
      if (n < 0)
        {
          if (errno == EINTR)
            continue;
          return -1;
        }
      keep_received_fds (&msg, fd_out);
      if (n == 0)
        {
          errno = ECONNRESET;
          return -1;
        }
      buf += n;
      len -= (size_t) n;
    }
  return 0;
}

/* Sends one framed request on SOCK. Returns 0, or -1 with errno set. */
static int
send_request (int sock, struct request *q)
{
  uint32_t body_len;

  if (q->failed)
    {
      errno = ENOMEM;
      return -1;
    }
  body_len = (uint32_t) (q->sb.size - 4);
  q->sb.data[0] = (char) (body_len >> 24);
  q->sb.data[1] = (char) (body_len >> 16);
  q->sb.data[2] = (char) (body_len >> 8);
  q->sb.data[3] = (char) body_len;
  return send_all (sock, q->sb.data, q->sb.size);
}

/* Receives the next reply on SOCK into r (freshly initialised). Returns 0, or -1 with
 * errno set for a transport failure; r->map is the decoded reply. */
static int
recv_reply (int sock, struct reply *r)
{
  unsigned char header[4];
  size_t off = 0;

  if (recv_exact (sock, (char *) header, sizeof (header), &r->fd) < 0)
    return -1;
  r->len = ((uint32_t) header[0] << 24) | ((uint32_t) header[1] << 16) | ((uint32_t) header[2] << 8)
           | (uint32_t) header[3];
  if (r->len == 0 || r->len > CRFS_MAX_FRAME)
    {
      errno = EPROTO;
      return -1;
    }
  r->buf = malloc (r->len);
  if (r->buf == NULL)
    return -1; /* the stream is now out of step: the caller drops the connection */
  if (recv_exact (sock, r->buf, r->len, &r->fd) < 0)
    return -1;
  if (msgpack_unpack_next (&r->up, r->buf, r->len, &off) != MSGPACK_UNPACK_SUCCESS
      || r->up.data.type != MSGPACK_OBJECT_MAP)
    {
      errno = EPROTO;
      return -1;
    }
  r->map = &r->up.data;
  return 0;
}

/* One request/reply exchange on SOCK. Returns 0, or -1 with errno set for a transport
 * failure (the caller may reconnect); r->map is the decoded reply. */
static int
exchange_on (int sock, struct request *q, struct reply *r)
{
  if (send_request (sock, q) < 0)
    return -1;
  return recv_reply (sock, r);
}

/* The same on the connection of synchronous calls. */
static int
exchange (struct request *q, struct reply *r)
{
  return exchange_on (state.sock, q, r);
}

/* The worker's verdict: 0, or -1 with errno from the reply. */
static int
reply_status (const struct reply *r)
{
  uint64_t err = 0;

  if (! reply_uint (r, "err", &err))
    {
      errno = EPROTO;
      return -1;
    }
  if (err != 0)
    {
      errno = (err < 4096) ? (int) err : EIO;
      return -1;
    }
  return 0;
}

/* ---- Finding, checking and starting the worker ---- */

static int
runtime_dir (char *out, size_t size)
{
  const char *explicit = getenv ("CRFS_RUNTIME_DIR");
  const char *xdg = getenv ("XDG_RUNTIME_DIR");
  int n;

  if (explicit && *explicit)
    n = snprintf (out, size, "%s", explicit);
  else if (xdg && *xdg)
    n = snprintf (out, size, "%s/crfs", xdg);
  else
    n = snprintf (out, size, "/tmp/crfs-%u", (unsigned) geteuid ());
  if (n < 0 || (size_t) n >= size)
    {
      errno = ENAMETOOLONG;
      return -1;
    }
  return 0;
}

/* A socket in a directory others can write could be anybody's: refuse it. */
static int
check_private_dir (const char *dir)
{
  struct stat st;

  if (stat (dir, &st) < 0)
    return -1;
  if (! S_ISDIR (st.st_mode) || st.st_uid != geteuid () || (st.st_mode & 077) != 0)
    {
      fprintf (stderr, "crfs: %s must be a directory owned by uid %u with mode 0700\n", dir,
               (unsigned) geteuid ());
      errno = EPERM;
      return -1;
    }
  return 0;
}

static int
connect_once (const char *sock_path)
{
  struct sockaddr_un addr;
  struct ucred cred;
  socklen_t cred_len = sizeof (cred);
  int fd;

  memset (&addr, 0, sizeof (addr));
  addr.sun_family = AF_UNIX;
  if (strlen (sock_path) >= sizeof (addr.sun_path))
    {
      errno = ENAMETOOLONG;
      return -1;
    }
  strcpy (addr.sun_path, sock_path);
  fd = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return -1;
  if (connect (fd, (struct sockaddr *) &addr, sizeof (addr)) < 0)
    {
      int saved = errno;
      close (fd);
      errno = saved;
      return -1;
    }
  /* Only a worker running as ourselves may answer for our layers. */
  if (getsockopt (fd, SOL_SOCKET, SO_PEERCRED, &cred, &cred_len) < 0 || cred.uid != geteuid ())
    {
      fprintf (stderr, "crfs: %s is served by uid %u, not by us\n", sock_path, (unsigned) cred.uid);
      close (fd);
      errno = EPERM;
      return -1;
    }
  return fd;
}

/* Splits the worker command on blanks into argv (no shell, no quoting). */
static int
worker_argv (char *cmd, char **argv, size_t max)
{
  size_t n = 0;
  char *save = NULL, *tok;

  for (tok = strtok_r (cmd, " \t", &save); tok; tok = strtok_r (NULL, " \t", &save))
    {
      if (n + 1 >= max)
        {
          errno = E2BIG;
          return -1;
        }
      argv[n++] = tok;
    }
  argv[n] = NULL;
  if (n == 0)
    {
      errno = EINVAL;
      return -1;
    }
  return 0;
}

/* Closes every fd from FIRST up. */
static void
close_fds_from (unsigned int first)
{
#ifdef SYS_close_range
  if (syscall (SYS_close_range, first, ~0U, 0U) == 0)
    return;
#endif
  {
    long max = sysconf (_SC_OPEN_MAX);
    long i;
    for (i = first; i < (max > 0 ? max : 65536); i++)
      close ((int) i);
  }
}

extern char **environ;

/* The worker's environment: ours, plus CRFS_WORKER_READY_FD=3. Built before fork. */
static char **
worker_environ (void)
{
  size_t n = 0, i, j = 0;
  char **envp;

  while (environ && environ[n])
    n++;
  envp = calloc (n + 2, sizeof (*envp));
  if (envp == NULL)
    return NULL;
  for (i = 0; i < n; i++)
    if (strncmp (environ[i], "CRFS_WORKER_READY_FD=", 21) != 0)
      envp[j++] = environ[i];
  envp[j++] = (char *) "CRFS_WORKER_READY_FD=3";
  envp[j] = NULL;
  return envp;
}

/* Detached start: nothing of ours (least of all stderr, which podman waits on) survives
 * into the worker, except the write end of a report pipe as fd 3: the worker writes
 * "ready" or "error: WHY" on it, and an exec failure writes "exec ERRNO". Returns the
 * read end (or -1). Everything that allocates happens before fork. */
static int
start_worker (void)
{
  const char *env = getenv ("CRFS_WORKER_CMD");
  char *cmd = strdup ((env && *env) ? env : CRFS_DEFAULT_WORKER_CMD);
  char **envp = worker_environ ();
  char *argv[CRFS_MAX_ARGS];
  int report[2] = { -1, -1 };
  pid_t pid;
  int status, saved;

  if (cmd == NULL || envp == NULL || worker_argv (cmd, argv, CRFS_MAX_ARGS) < 0 || pipe2 (report, O_CLOEXEC) < 0)
    goto fail;
  trace ("start worker: %s", argv[0]);
  pid = fork ();
  if (pid < 0)
    goto fail;
  if (pid == 0)
    {
      char line[32];
      int nul, len;
      sigset_t all;

      setsid ();
      if (fork () != 0)
        _exit (0);
      nul = open ("/dev/null", O_RDWR);
      if (nul < 0)
        _exit (126);
      dup2 (nul, 0);
      dup2 (nul, 1);
      dup2 (nul, 2);
      dup2 (report[1], 3); /* dup2 clears close-on-exec: the worker keeps fd 3 */
      close_fds_from (4);
      sigemptyset (&all);
      sigprocmask (SIG_SETMASK, &all, NULL);
      signal (SIGPIPE, SIG_DFL);
      signal (SIGHUP, SIG_DFL);
      execvpe (argv[0], argv, envp);
      len = snprintf (line, sizeof (line), "exec %d\n", errno);
      if (len > 0 && write (3, line, (size_t) len) < 0)
        _exit (127);
      _exit (127);
    }
  free (cmd);
  free (envp);
  close (report[1]);
  while (waitpid (pid, &status, 0) < 0 && errno == EINTR)
    ;
  return report[0];

fail:
  saved = errno;
  free (cmd);
  free (envp);
  if (report[0] >= 0)
    {
      close (report[0]);
      close (report[1]);
    }
  errno = saved;
  return -1;
}

/* Reads the started worker's report, waiting at most WAIT_MS. Returns 1 when it is
 * ready (or when the report channel closed: the socket will tell), 0 when nothing came
 * yet, -1 with errno when it could not start (and says why on stderr). */
static int
worker_report (int fd, char *buf, size_t size, size_t *used, int wait_ms)
{
  struct pollfd p = { fd, POLLIN, 0 };
  ssize_t n;
  char *nl;

  if (poll (&p, 1, wait_ms) <= 0)
    return 0;
  n = read (fd, buf + *used, size - 1 - *used);
  if (n < 0)
    return errno == EINTR ? 0 : 1;
  *used += (size_t) n;
  buf[*used] = '\0';
  nl = strchr (buf, '\n');
  if (nl == NULL && n > 0 && *used < size - 1)
    return 0;
  if (nl)
    *nl = '\0';
  if (strncmp (buf, "exec ", 5) == 0)
    {
      errno = atoi (buf + 5);
      if (errno <= 0)
        errno = ENOEXEC;
      return -1;
    }
  if (strncmp (buf, "error: ", 7) == 0)
    {
      fprintf (stderr, "crfs: the worker could not start: %s\n", buf + 7);
      errno = EIO;
      return -1;
    }
  return 1; /* "ready", or EOF: connect */
}

static double
monotonic_seconds (void)
{
  struct timespec ts;
  clock_gettime (CLOCK_MONOTONIC, &ts);
  return (double) ts.tv_sec + (double) ts.tv_nsec / 1e9;
}

static void
report_start_failure (void)
{
  const char *cmd = getenv ("CRFS_WORKER_CMD");
  fprintf (stderr, "crfs: cannot start the worker '%s': %s\n", (cmd && *cmd) ? cmd : CRFS_DEFAULT_WORKER_CMD,
           strerror (errno));
}

static int hello_on (int sock);

/* Connects (starting a worker if none answers) and greets. Called with the lock held. */
static int
connect_locked (void)
{
  char dir[PATH_MAX], sock_path[PATH_MAX];
  const char *timeout_env = getenv ("CRFS_WORKER_START_TIMEOUT");
  double timeout = (timeout_env && *timeout_env) ? atof (timeout_env) : 30.0;
  double deadline;
  bool started = false;
  char line[512];
  size_t used = 0;
  int fd = -1, report = -1, saved;

  if (state.sock >= 0)
    return 0;
  if (runtime_dir (dir, sizeof (dir)) < 0)
    return -1;
  if (snprintf (sock_path, sizeof (sock_path), "%s/worker.sock", dir) >= (int) sizeof (sock_path))
    {
      errno = ENAMETOOLONG;
      return -1;
    }
  deadline = monotonic_seconds () + timeout;
  for (;;)
    {
      if (access (dir, F_OK) == 0 && check_private_dir (dir) < 0)
        break;
      fd = connect_once (sock_path);
      if (fd >= 0 || (errno != ENOENT && errno != ECONNREFUSED))
        break;
      if (! started)
        {
          report = start_worker ();
          if (report < 0)
            {
              report_start_failure ();
              break;
            }
          started = true;
        }
      if (report >= 0)
        {
          int r = worker_report (report, line, sizeof (line), &used, 20);
          if (r < 0)
            {
              if (errno != EIO)
                report_start_failure ();
              break;
            }
          if (r > 0)
            {
              close (report);
              report = -1;
            }
        }
      else
        {
          struct timespec pause = { 0, 20 * 1000 * 1000 };
          nanosleep (&pause, NULL);
        }
      if (monotonic_seconds () > deadline)
        {
          fprintf (stderr, "crfs: no worker answered at %s (set CRFS_WORKER_CMD?)\n", sock_path);
          errno = ETIMEDOUT;
          break;
        }
    }
  saved = errno;
  if (report >= 0)
    close (report);
  errno = saved;
  if (fd < 0)
    return -1;
  state.sock = fd;
  if (hello_on (fd) < 0)
    {
      int saved = errno;
      close (state.sock);
      state.sock = -1;
      errno = saved;
      return -1;
    }
  return 0;
}

static void
disconnect_locked (void)
{
  if (state.sock >= 0)
    close (state.sock);
  state.sock = -1;
}

/* Greets the worker on SOCK: it must speak our protocol. */
static int
hello_on (int sock)
{
  struct request q;
  struct reply r;
  uint64_t version = 0;
  int ret;

  req_begin (&q, "hello", 1);
  req_uint (&q, "version", CRFS_PROTOCOL_VERSION);
  reply_init (&r);
  ret = exchange_on (sock, &q, &r);
  if (ret == 0)
    ret = reply_status (&r);
  if (ret == 0 && (! reply_uint (&r, "version", &version) || version != CRFS_PROTOCOL_VERSION))
    {
      fprintf (stderr, "crfs: the worker speaks protocol %llu, not %d\n", (unsigned long long) version,
               CRFS_PROTOCOL_VERSION);
      errno = EPROTO;
      ret = -1;
    }
  req_free (&q);
  reply_free (&r);
  return ret;
}

static int refresh_layer_fds_locked (void);

/* Sends q and fills r. Transport failures reconnect once (a restarted worker) and retry:
 * every request is idempotent. Returns the worker's verdict as 0 or -1/errno; a worker
 * that cannot be reached is EIO (never ENOENT, which would read as "absent"). */
static int
call (struct request *q, struct reply *r)
{
  int attempt, ret = -1, saved = EIO;

  pthread_mutex_lock (&state.lock);
  for (attempt = 0; attempt < 2; attempt++)
    {
      if (connect_locked () < 0)
        {
          trace ("connect failure: %s", strerror (errno));
          break;
        }
      if (state.stale_fds)
        {
          if (refresh_layer_fds_locked () < 0)
            {
              trace ("refresh failure: %s", strerror (errno));
              disconnect_locked ();
              continue;
            }
          state.stale_fds = false;
        }
      reply_free (r);
      reply_init (r);
      if (exchange (q, r) == 0)
        {
          ret = reply_status (r);
          saved = errno;
          break;
        }
      trace ("transport failure: %s", strerror (errno));
      disconnect_locked ();
      state.stale_fds = state.layers != NULL;
    }
  pthread_mutex_unlock (&state.lock);
  req_free (q);
  errno = ret < 0 ? saved : 0;
  return ret;
}

/* ---- Layer numbers, root fds ---- */

static int
root_fd_locked (uint64_t num, int *fd_out, dev_t *dev_out)
{
  struct request q;
  struct reply r;
  struct stat st;
  int ret;

  req_begin (&q, "root", 1);
  req_uint (&q, "layer", num);
  reply_init (&r);
  ret = exchange (&q, &r);
  if (ret == 0)
    ret = reply_status (&r);
  if (ret < 0 && r.map != NULL)
    {
      int saved = errno;
      char subject[32];
      snprintf (subject, sizeof (subject), "%llu", (unsigned long long) num);
      report_failure ("cannot open the root of layer", subject, &r, saved);
      errno = saved;
    }
  if (ret == 0 && r.fd < 0)
    {
      errno = EPROTO;
      ret = -1;
    }
  if (ret == 0 && (fstat (r.fd, &st) < 0 || ! S_ISDIR (st.st_mode)))
    {
      errno = ENOTDIR;
      ret = -1;
    }
  if (ret == 0)
    {
      *dev_out = st.st_dev;
      *fd_out = reply_take_fd (&r);
    }
  req_free (&q);
  reply_free (&r);
  return ret;
}

/* After a worker restart the old root fds point at a dead view: replace them in place,
 * because fuse-overlayfs holds the numbers. */
static int
refresh_layer_fds_locked (void)
{
  struct crfs_layer *it;

  for (it = state.layers; it; it = it->next)
    {
      int fd;
      dev_t dev;

      if (root_fd_locked (it->num, &fd, &dev) < 0)
        return -1;
      if (it->ovl->fd >= 0 && it->ovl->fd != fd)
        {
          if (dup3 (fd, it->ovl->fd, O_CLOEXEC) < 0)
            {
              close (fd);
              return -1;
            }
          close (fd);
        }
      else
        it->ovl->fd = fd;
      it->dev = dev;
    }
  return 0;
}

static bool
valid_key (const char *key)
{
  if (key == NULL || *key == '\0' || strlen (key) > 128)
    return false;
  return strpbrk (key, ":,/") == NULL;
}

/* Asks which layers KEY stands for; fills nums (uppermost first). Returns the count. */
static int
key_layers (const char *key, uint64_t *nums, size_t max)
{
  struct request q;
  struct reply r;
  const msgpack_object *list;
  uint32_t i;
  int ret;

  if (! valid_key (key))
    {
      fprintf (stderr, "crfs: invalid layer key '%s' (no ':', ',' or '/')\n", key ? key : "");
      errno = EINVAL;
      return -1;
    }
  req_begin (&q, "layers", 1);
  req_str (&q, "key", key);
  reply_init (&r);
  ret = call (&q, &r);
  if (ret < 0)
    {
      int saved = errno;
      report_failure ("cannot resolve key", key, &r, saved);
      reply_free (&r);
      errno = saved;
      return -1;
    }
  list = reply_get (&r, "layers");
  if (list == NULL || list->type != MSGPACK_OBJECT_ARRAY || list->via.array.size == 0
      || list->via.array.size > max)
    {
      reply_free (&r);
      errno = EPROTO;
      return -1;
    }
  for (i = 0; i < list->via.array.size; i++)
    {
      if (list->via.array.ptr[i].type != MSGPACK_OBJECT_POSITIVE_INTEGER)
        {
          reply_free (&r);
          errno = EPROTO;
          return -1;
        }
      nums[i] = list->via.array.ptr[i].via.u64;
    }
  ret = (int) list->via.array.size;
  reply_free (&r);
  return ret;
}

#define CRFS_MAX_LAYERS 512

/* ---- Paths ---- */

/* fuse-overlayfs hands paths like "/x", "./x", "a/.wh.b", "." or "": this makes them
 * "x", "a/.wh.b" and "" (the root). ".." never names anything inside a layer. */
static int
normalize_path (const char *in, char *out, size_t size)
{
  const char *p = in ? in : "";
  size_t o = 0;

  while (*p)
    {
      const char *end = strchr (p, '/');
      size_t len = end ? (size_t) (end - p) : strlen (p);

      if (len == 2 && p[0] == '.' && p[1] == '.')
        {
          errno = ENOENT;
          return -1;
        }
      if (len > 0 && ! (len == 1 && p[0] == '.'))
        {
          if (o + (o > 0) + len + 1 > size)
            {
              errno = ENAMETOOLONG;
              return -1;
            }
          if (o > 0)
            out[o++] = '/';
          memcpy (out + o, p, len);
          o += len;
        }
      p += len;
      if (*p == '/')
        p++;
    }
  out[o] = '\0';
  return 0;
}

static struct crfs_layer *
layer_of (struct ovl_layer *l)
{
  return (struct crfs_layer *) l->data_source_private_data;
}

/* Starts a request about NORM (a normalised path) in layer L. */
static void
req_path (struct request *q, const char *op, struct ovl_layer *l, const char *norm, size_t extra)
{
  req_begin (q, op, 2 + extra);
  req_uint (q, "layer", layer_of (l)->num);
  req_bin (q, "path", norm);
}

/* ---- Metadata cache: whole directories, fetched once ("list"). fuse-overlayfs asks
 * file_exists(.wh.X), statat and several getxattr for every entry it meets; answering
 * them from one listing per directory saves a round trip each. ---- */

static void
free_entry (struct cached_entry *e)
{
  free (e->name);
  free (e->xattr_names);
  free (e->target);
  e->name = NULL;
  e->xattr_names = NULL;
  e->target = NULL;
}

static void
free_dir (struct cached_dir *d)
{
  size_t i;

  for (i = 0; i < d->count; i++)
    free_entry (&d->entries[i]);
  free (d->entries);
  free (d->path);
  free (d);
}

static void
flush_cache (struct crfs_layer *cl)
{
  size_t b;

  for (b = 0; b < CRFS_CACHE_BUCKETS; b++)
    while (cl->dirs[b])
      {
        struct cached_dir *next = cl->dirs[b]->next;
        free_dir (cl->dirs[b]);
        cl->dirs[b] = next;
      }
  cl->cached_entries = 0;
  cl->target_bytes = 0;
}

static void
free_layer (struct crfs_layer *cl)
{
  flush_cache (cl);
  if (cl->have_root)
    free_entry (&cl->root);
  free (cl);
}

static uint32_t
path_bucket (const char *s)
{
  uint32_t h = 2166136261u; /* FNV-1a */

  for (; *s; s++)
    {
      h ^= (unsigned char) *s;
      h *= 16777619u;
    }
  return h % CRFS_CACHE_BUCKETS;
}

static int
parse_stat_array (const msgpack_object *a, size_t first, uint64_t v[CRFS_STAT_FIELDS])
{
  size_t i;

  if (a->type != MSGPACK_OBJECT_ARRAY || a->via.array.size < first + CRFS_STAT_FIELDS)
    {
      errno = EPROTO;
      return -1;
    }
  for (i = 0; i < CRFS_STAT_FIELDS; i++)
    {
      const msgpack_object *o = &a->via.array.ptr[first + i];
      if (o->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
        {
          errno = EPROTO;
          return -1;
        }
      v[i] = o->via.u64;
    }
  return 0;
}

static int
parse_xattr_names (const msgpack_object *list, struct cached_entry *e)
{
  size_t total = 0, off = 0;
  uint32_t i;

  if (list == NULL || list->type != MSGPACK_OBJECT_ARRAY)
    {
      errno = EPROTO;
      return -1;
    }
  for (i = 0; i < list->via.array.size; i++)
    {
      const msgpack_object *o = &list->via.array.ptr[i];
      if (o->type != MSGPACK_OBJECT_BIN || o->via.bin.size == 0 || memchr (o->via.bin.ptr, 0, o->via.bin.size))
        {
          errno = EPROTO;
          return -1;
        }
      total += o->via.bin.size + 1;
    }
  if (total > INT_MAX)
    {
      errno = E2BIG;
      return -1;
    }
  e->xattr_len = (uint32_t) total;
  if (total == 0)
    return 0;
  e->xattr_names = malloc (total);
  if (e->xattr_names == NULL)
    return -1;
  for (i = 0; i < list->via.array.size; i++)
    {
      const msgpack_object_bin *b = &list->via.array.ptr[i].via.bin;
      memcpy (e->xattr_names + off, b->ptr, b->size);
      off += b->size;
      e->xattr_names[off++] = '\0';
    }
  return 0;
}

/* One row of a listing: [name, ino, mode, nlink, uid, gid, size, mtime_ns, major, minor, [xattrs]]. */
static int
parse_entry (const msgpack_object *row, struct cached_entry *e)
{
  const msgpack_object *name;

  memset (e, 0, sizeof (*e));
  if (row->type != MSGPACK_OBJECT_ARRAY || row->via.array.size != CRFS_STAT_FIELDS + 2)
    {
      errno = EPROTO;
      return -1;
    }
  name = &row->via.array.ptr[0];
  if (name->type != MSGPACK_OBJECT_BIN || name->via.bin.size == 0 || memchr (name->via.bin.ptr, 0, name->via.bin.size)
      || memchr (name->via.bin.ptr, '/', name->via.bin.size))
    {
      errno = EPROTO;
      return -1;
    }
  if (parse_stat_array (row, 1, e->st) < 0)
    return -1;
  e->name = strndup (name->via.bin.ptr, name->via.bin.size);
  if (e->name == NULL)
    return -1;
  if (parse_xattr_names (&row->via.array.ptr[CRFS_STAT_FIELDS + 1], e) < 0)
    {
      free_entry (e);
      return -1;
    }
  return 0;
}

static int
entry_cmp (const void *a, const void *b)
{
  return strcmp (((const struct cached_entry *) a)->name, ((const struct cached_entry *) b)->name);
}

static void
insert_dir (struct crfs_layer *cl, struct cached_dir *d)
{
  uint32_t b;

  if (cl->cached_entries + d->count + 1 > CRFS_CACHE_MAX_ENTRIES)
    flush_cache (cl); /* bounded memory; a flush only costs round trips */
  b = path_bucket (d->path);
  d->next = cl->dirs[b];
  cl->dirs[b] = d;
  cl->cached_entries += d->count + 1;
}

static void
list_request (struct request *q, struct crfs_layer *cl, const char *dir)
{
  req_begin (q, "list", 2);
  req_uint (q, "layer", cl->num);
  req_bin (q, "path", dir);
}

/* DIR's listing from the reply to its `list` request (ERR: the request's errno, 0 when
 * it succeeded): a new cached_dir, one that records that DIR is absent, or NULL with
 * errno (nothing to keep). */
static struct cached_dir *
listing_of_reply (const char *dir, int err, const struct reply *r)
{
  const msgpack_object *rows;
  struct cached_dir *d;
  uint32_t i;
  int saved;

  if (err != 0 && err != ENOENT && err != ENOTDIR)
    {
      errno = err;
      return NULL;
    }
  d = calloc (1, sizeof (*d));
  if (d == NULL)
    return NULL;
  d->path = strdup (dir);
  if (d->path == NULL)
    {
      free (d);
      return NULL;
    }
  if (err != 0)
    {
      d->error = err; /* absence is as permanent as presence */
      return d;
    }
  rows = reply_get (r, "entries");
  if (rows == NULL || rows->type != MSGPACK_OBJECT_ARRAY)
    {
      free_dir (d);
      errno = EPROTO;
      return NULL;
    }
  d->entries = calloc (rows->via.array.size ? rows->via.array.size : 1, sizeof (*d->entries));
  if (d->entries == NULL)
    {
      free_dir (d);
      return NULL;
    }
  for (i = 0; i < rows->via.array.size; i++)
    {
      if (parse_entry (&rows->via.array.ptr[i], &d->entries[i]) < 0)
        {
          saved = errno;
          free_dir (d);
          errno = saved;
          return NULL;
        }
      d->count++;
    }
  qsort (d->entries, d->count, sizeof (*d->entries), entry_cmp);
  return d;
}

/* Fetches DIR's listing (or the fact that it is absent). Called with cache_lock held. */
static struct cached_dir *
fetch_dir (struct crfs_layer *cl, const char *dir)
{
  struct request q;
  struct reply r;
  struct cached_dir *d;
  int ret, saved;

  list_request (&q, cl, dir);
  reply_init (&r);
  ret = call (&q, &r);
  d = listing_of_reply (dir, ret < 0 ? errno : 0, &r);
  saved = errno;
  reply_free (&r);
  trace ("list(%llu, %s) = %d errno %d", (unsigned long long) cl->num, dir, d ? 0 : -1, d ? d->error : saved);
  if (d != NULL)
    insert_dir (cl, d);
  errno = saved;
  return d;
}

static int
fetch_root (struct crfs_layer *cl)
{
  struct request q;
  struct reply r;
  const msgpack_object *st;
  int ret;

  memset (&cl->root, 0, sizeof (cl->root));
  req_begin (&q, "stat", 2);
  req_uint (&q, "layer", cl->num);
  req_bin (&q, "path", "");
  reply_init (&r);
  ret = call (&q, &r);
  st = reply_get (&r, "st");
  if (ret == 0 && (st == NULL || parse_stat_array (st, 0, cl->root.st) < 0))
    {
      errno = EPROTO;
      ret = -1;
    }
  reply_free (&r);
  if (ret < 0)
    return -1;
  req_begin (&q, "listxattr", 2);
  req_uint (&q, "layer", cl->num);
  req_bin (&q, "path", "");
  reply_init (&r);
  ret = call (&q, &r);
  if (ret == 0)
    ret = parse_xattr_names (reply_get (&r, "names"), &cl->root);
  reply_free (&r);
  if (ret < 0)
    return -1;
  cl->root.name = strdup ("");
  if (cl->root.name == NULL)
    {
      free_entry (&cl->root);
      return -1;
    }
  cl->have_root = true;
  return 0;
}

/* DIR's listing if it is cached, else NULL. Called with cache_lock held. */
static struct cached_dir *
cached_dir (struct crfs_layer *cl, const char *dir)
{
  struct cached_dir *d;

  for (d = cl->dirs[path_bucket (dir)]; d; d = d->next)
    if (strcmp (d->path, dir) == 0)
      return d;
  return NULL;
}

/* The directory part of normalised PATH ("" at the top) into DIR; returns the last name. */
static const char *
split_path (const char *path, char dir[PATH_MAX])
{
  const char *slash = strrchr (path, '/');
  size_t n = slash ? (size_t) (slash - path) : 0;

  memcpy (dir, path, n);
  dir[n] = '\0';
  return slash ? slash + 1 : path;
}

/* DIR/NAME (NAME alone at the top) into OUT; false if it does not fit. */
static bool
join_path (char out[PATH_MAX], const char *dir, const char *name)
{
  int n = snprintf (out, PATH_MAX, "%s%s%s", dir, *dir ? "/" : "", name);
  return n > 0 && n < PATH_MAX;
}

/* The cached entry of symlink PATH if its directory's listing is cached, else NULL. */
static struct cached_entry *
cached_link (struct crfs_layer *cl, const char *path)
{
  char dir[PATH_MAX];
  struct cached_entry key;
  struct cached_entry *e;
  const struct cached_dir *d;

  key.name = (char *) split_path (path, dir);
  d = cached_dir (cl, dir);
  if (d == NULL || d->error)
    return NULL;
  e = bsearch (&key, d->entries, d->count, sizeof (*d->entries), entry_cmp);
  return e != NULL && S_ISLNK (e->st[1]) ? e : NULL;
}

/* Keeps the target from a `readlink` reply in E, a symlink of CL. */
static int
keep_target (struct crfs_layer *cl, struct cached_entry *e, const struct reply *r)
{
  const char *target = NULL;
  uint32_t len = 0;

  if (! reply_bytes (r, "target", &target, &len) || len == 0 || len >= PATH_MAX)
    {
      errno = EPROTO;
      return -1;
    }
  e->target = malloc (len);
  if (e->target == NULL)
    return -1;
  memcpy (e->target, target, len);
  e->target_len = len;
  cl->target_bytes += len;
  return 0;
}

static void
link_request (struct request *q, struct crfs_layer *cl, const char *path)
{
  req_begin (q, "readlink", 2);
  req_uint (q, "layer", cl->num);
  req_bin (q, "path", path);
}

/* ---- Listing ahead. A walk (find, du, ls -R, a first `podman cp`) lists a directory,
 * then each of its subdirectories, and every `list` is a round trip during which
 * fuse-overlayfs waits for the worker. So when load_dir lists a directory, its
 * subdirectories are asked for ahead, a few at a time, on a second connection (the
 * worker serves each connection in its own thread): the worker builds them while
 * fuse-overlayfs and the kernel work through the entries at hand, and get_dir takes a
 * reply when the walk gets there. The directories asked for last go first (walks go
 * depth first). A directory that is listed has its subdirectories asked for, and so
 * has the parent of one missed on demand, once per directory; the look-ahead never
 * fills more than half the cache, never starts a worker, and a failure only drops it
 * (get_dir then asks on the ordinary connection). When one symlink is read on demand, the directory's other
 * symlinks are read ahead the same way. CRFS_LIST_AHEAD: requests in flight (0 turns
 * it off). Everything here runs with cache_lock held. ---- */

static void
ahead_free (struct ahead_item *a)
{
  free (a->path);
  a->path = NULL;
  a->cl = NULL;
  a->link = false;
  a->cost = 0;
}

static size_t
ahead_depth (void)
{
  if (state.ahead_depth < 0)
    {
      const char *v = getenv ("CRFS_LIST_AHEAD");
      long n = (v && *v) ? strtol (v, NULL, 10) : CRFS_AHEAD_DEFAULT;
      state.ahead_depth = n < 0 ? 0 : (n > CRFS_AHEAD_MAX ? CRFS_AHEAD_MAX : (int) n);
    }
  return (size_t) state.ahead_depth;
}

/* Closes the look-ahead connection; the replies in flight are lost (nothing waits for
 * them: get_dir asks again on the ordinary connection). */
static void
ahead_disconnect (void)
{
  if (state.ahead_sock >= 0)
    close (state.ahead_sock);
  state.ahead_sock = -1;
  state.ahead_bytes = 0;
  for (; state.ahead_count > 0; state.ahead_count--)
    {
      ahead_free (&state.ahead[state.ahead_first]);
      state.ahead_first = (state.ahead_first + 1) % CRFS_AHEAD_MAX;
    }
}

/* Opens the look-ahead connection to the worker that answers the ordinary one. */
static int
ahead_connect (void)
{
  char dir[PATH_MAX], sock_path[PATH_MAX];
  socklen_t len = sizeof (int);
  int fd, sndbuf = 0;
  bool up;

  if (state.ahead_sock >= 0)
    return 0;
  pthread_mutex_lock (&state.lock);
  up = state.sock >= 0 && ! state.stale_fds;
  pthread_mutex_unlock (&state.lock);
  if (! up)
    {
      errno = ENOTCONN;
      return -1;
    }
  if (runtime_dir (dir, sizeof (dir)) < 0)
    return -1;
  if (snprintf (sock_path, sizeof (sock_path), "%s/worker.sock", dir) >= (int) sizeof (sock_path))
    {
      errno = ENAMETOOLONG;
      return -1;
    }
  fd = connect_once (sock_path);
  if (fd < 0)
    return -1;
  if (hello_on (fd) < 0 || getsockopt (fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, &len) < 0)
    {
      int saved = errno;
      close (fd);
      errno = saved;
      return -1;
    }
  /* Requests the worker has not read are charged to our send buffer. While it waits
   * for us to read its replies it reads no requests, so only what fits in half the
   * buffer may be in flight: a send must never block (that would hang us both). */
  state.ahead_room = (size_t) sndbuf / 2;
  state.ahead_sock = fd;
  return 0;
}

/* Position of DIR of CL among the requests in flight (0: the next reply), or -1. */
static long
ahead_position (struct crfs_layer *cl, const char *dir)
{
  size_t i;

  for (i = 0; i < state.ahead_count; i++)
    {
      const struct ahead_item *a = &state.ahead[(state.ahead_first + i) % CRFS_AHEAD_MAX];
      if (a->cl == cl && strcmp (a->path, dir) == 0)
        return (long) i;
    }
  return -1;
}

/* Remembers that directory PATH may be listed soon (symlink PATH read, if LINK). The stack keeps the newest
 * CRFS_AHEAD_WANTED; older ones are forgotten. */
static void
ahead_want (struct crfs_layer *cl, const char *path, bool link)
{
  struct ahead_item *slot = &state.wanted[state.wanted_next];

  if (state.wanted_count == CRFS_AHEAD_WANTED)
    ahead_free (slot); /* a full ring: the next slot holds the oldest */
  else
    state.wanted_count++;
  slot->path = strdup (path);
  slot->cl = slot->path ? cl : NULL; /* no memory: a slot that is skipped */
  slot->link = link;
  state.wanted_next = (state.wanted_next + 1) % CRFS_AHEAD_WANTED;
}

/* Takes the newest wanted directory off the stack into OUT. */
static bool
ahead_pop (struct ahead_item *out)
{
  if (state.wanted_count == 0)
    return false;
  state.wanted_next = (state.wanted_next + CRFS_AHEAD_WANTED - 1) % CRFS_AHEAD_WANTED;
  *out = state.wanted[state.wanted_next];
  state.wanted[state.wanted_next].path = NULL;
  state.wanted[state.wanted_next].cl = NULL;
  state.wanted_count--;
  return true;
}

/* Wants the subdirectories of D that are neither cached nor asked for. */
static void
ahead_want_subdirs (struct crfs_layer *cl, struct cached_dir *d)
{
  size_t i;

  if (ahead_depth () == 0 || d->error || d->ahead_done || cl->cached_entries > CRFS_CACHE_MAX_ENTRIES / 2)
    return;
  d->ahead_done = true; /* a miss under it would otherwise rescan it: once is enough */
  /* Backwards: the first name ends on top of the stack. */
  for (i = d->count; i-- > 0;)
    if (S_ISDIR (d->entries[i].st[1]))
      {
        char path[PATH_MAX];
        if (join_path (path, d->path, d->entries[i].name) && cached_dir (cl, path) == NULL
            && ahead_position (cl, path) < 0)
          ahead_want (cl, path, false);
      }
}

/* Asks for wanted directories until CRFS_LIST_AHEAD requests are in flight. */
static void
ahead_send (void)
{
  size_t depth = ahead_depth ();
  struct ahead_item a;

  while (state.ahead_count < depth && ahead_pop (&a))
    {
      const struct cached_entry *e = a.link && a.cl ? cached_link (a.cl, a.path) : NULL;
      const char *what = a.link ? "readlink" : "list";
      struct request q;
      int ret;

      if (a.cl == NULL || a.cl->cached_entries > CRFS_CACHE_MAX_ENTRIES / 2
          || (a.link ? e == NULL || e->target != NULL : cached_dir (a.cl, a.path) != NULL)
          || ahead_position (a.cl, a.path) >= 0)
        {
          ahead_free (&a);
          continue;
        }
      if (ahead_connect () < 0)
        {
          /* Not one connect per wanted item (the worker may be exiting): drop them all. */
          ahead_free (&a);
          while (ahead_pop (&a))
            ahead_free (&a);
          return;
        }
      if (a.link)
        link_request (&q, a.cl, a.path);
      else
        list_request (&q, a.cl, a.path);
      a.cost = q.sb.size + CRFS_SKB_OVERHEAD;
      if (state.ahead_bytes + a.cost > state.ahead_room)
        {
          req_free (&q);
          ahead_want (a.cl, a.path, a.link); /* back on top: sent when replies have made room */
          ahead_free (&a);
          return;
        }
      ret = send_request (state.ahead_sock, &q); /* cannot block: see ahead_connect */
      req_free (&q);
      if (ret < 0)
        {
          trace ("%s ahead(%llu, %s): %s", what, (unsigned long long) a.cl->num, a.path, strerror (errno));
          ahead_free (&a);
          ahead_disconnect ();
          return;
        }
      trace ("%s ahead(%llu, %s)", what, (unsigned long long) a.cl->num, a.path);
      state.ahead[(state.ahead_first + state.ahead_count) % CRFS_AHEAD_MAX] = a;
      state.ahead_count++;
      state.ahead_bytes += a.cost;
    }
}

/* Takes the reply to the oldest request in flight into the cache. -1 when the
 * connection failed (it is dropped). */
static int
ahead_receive (void)
{
  struct ahead_item *a = &state.ahead[state.ahead_first];
  struct reply r;
  struct cached_dir *d = NULL;
  bool taken = false;
  int err = 0;

  reply_init (&r);
  if (recv_reply (state.ahead_sock, &r) < 0)
    {
      trace ("ahead: %s", strerror (errno));
      reply_free (&r);
      ahead_disconnect ();
      return -1;
    }
  if (reply_status (&r) < 0)
    err = errno;
  /* The layer may be gone (cleanup), the directory fetched since or its parent's
   * listing flushed. */
  if (a->cl != NULL && a->link)
    {
      struct cached_entry *e = cached_link (a->cl, a->path);
      taken = err == 0 && e != NULL && e->target == NULL && a->cl->target_bytes < CRFS_AHEAD_TARGET_BYTES
              && keep_target (a->cl, e, &r) == 0;
    }
  else if (a->cl != NULL && cached_dir (a->cl, a->path) == NULL)
    {
      d = listing_of_reply (a->path, err, &r);
      if (d != NULL && a->cl->cached_entries + d->count + 1 > CRFS_CACHE_MAX_ENTRIES / 2)
        {
          free_dir (d); /* the look-ahead never fills more than half the cache */
          d = NULL;
        }
      taken = d != NULL;
    }
  reply_free (&r);
  trace ("%s ahead(%llu, %s) = %s", a->link ? "readlink" : "list", a->cl ? (unsigned long long) a->cl->num : 0ULL,
         a->path, taken ? "taken" : "dropped");
  if (d != NULL)
    insert_dir (a->cl, d);
  state.ahead_bytes -= a->cost;
  ahead_free (a);
  state.ahead_first = (state.ahead_first + 1) % CRFS_AHEAD_MAX;
  state.ahead_count--;
  return 0;
}

/* Takes in the replies that have arrived, waiting for DIR of CL if it is in flight. */
static void
ahead_take (struct crfs_layer *cl, const char *dir)
{
  long wait = ahead_position (cl, dir) + 1; /* replies to take before DIR's is in */

  while (state.ahead_count > 0)
    {
      if (wait > 0)
        wait--;
      else
        {
          struct pollfd p = { state.ahead_sock, POLLIN, 0 };
          if (poll (&p, 1, 0) <= 0)
            break;
        }
      if (ahead_receive () < 0)
        break;
    }
}

static void ahead_siblings (struct crfs_layer *cl, const char *dir);

/* The listing of directory DIR (normalised), fetched if not cached yet; it may record
 * that DIR is absent (d->error). Valid until the next fetch. Called with cache_lock held. */
static struct cached_dir *
get_dir (struct crfs_layer *cl, const char *dir)
{
  struct cached_dir *d = cached_dir (cl, dir);

  if (d != NULL)
    return d;
  if (state.ahead_count > 0)
    {
      ahead_take (cl, dir);
      d = cached_dir (cl, dir);
    }
  if (d == NULL)
    d = fetch_dir (cl, dir);
  ahead_siblings (cl, dir);
  ahead_send (); /* sends only: D stays valid */
  return d;
}

/* DIR was just listed because it was looked up: fuse-overlayfs loads a directory when
 * the kernel looks it up, and the kernel looks up a directory's entries one after
 * another when it is read (find, ls -l): its other subdirectories come next, so they go
 * on top of the stack. */
static void
ahead_siblings (struct crfs_layer *cl, const char *dir)
{
  char parent[PATH_MAX];
  struct cached_dir *p;

  if (*dir == '\0')
    return;
  split_path (dir, parent);
  p = cached_dir (cl, parent);
  if (p != NULL)
    ahead_want_subdirs (cl, p);
}

/* Symlink PATH was just read on demand: the other symlinks of its directory that are
 * not read yet go on top of the stack. */
static void
ahead_links (struct crfs_layer *cl, const char *path)
{
  char dir[PATH_MAX];
  const struct cached_dir *d;
  size_t i;

  if (ahead_depth () == 0 || cl->target_bytes >= CRFS_AHEAD_TARGET_BYTES)
    return;
  split_path (path, dir);
  d = cached_dir (cl, dir);
  if (d == NULL || d->error)
    return;
  for (i = d->count; i-- > 0;)
    if (S_ISLNK (d->entries[i].st[1]) && d->entries[i].target == NULL)
      {
        char link[PATH_MAX];
        if (join_path (link, dir, d->entries[i].name) && ahead_position (cl, link) < 0)
          ahead_want (cl, link, true);
      }
}

/* Forgets the look-ahead's directories of CL (being freed); replies still in flight
 * are then dropped. */
static void
ahead_forget_layer (struct crfs_layer *cl)
{
  size_t i;

  for (i = 0; i < CRFS_AHEAD_MAX; i++)
    if (state.ahead[i].cl == cl)
      state.ahead[i].cl = NULL;
  for (i = 0; i < CRFS_AHEAD_WANTED; i++)
    if (state.wanted[i].cl == cl)
      state.wanted[i].cl = NULL;
}

/* Drops the look-ahead: its connection, requests in flight, wanted directories. */
static void
ahead_drop_all (void)
{
  struct ahead_item a;

  ahead_disconnect ();
  while (ahead_pop (&a))
    ahead_free (&a);
}


/* The cached entry for NORM (valid until the next fetch), or NULL with errno.
 * Called with cache_lock held. */
static const struct cached_entry *
find_entry (struct crfs_layer *cl, const char *norm)
{
  char dir[PATH_MAX];
  const char *name;
  struct cached_entry key;
  struct cached_dir *d;
  const struct cached_entry *e;

  if (*norm == '\0')
    {
      if (! cl->have_root && fetch_root (cl) < 0)
        return NULL;
      return &cl->root;
    }
  name = split_path (norm, dir);
  if ((d = get_dir (cl, dir)) == NULL)
    return NULL;
  if (d->error)
    {
      errno = d->error;
      return NULL;
    }
  key.name = (char *) name;
  e = bsearch (&key, d->entries, d->count, sizeof (*d->entries), entry_cmp);
  if (e == NULL)
    errno = ENOENT;
  return e;
}

static bool
has_xattr (const struct cached_entry *e, const char *name)
{
  uint32_t off = 0;

  while (off < e->xattr_len)
    {
      const char *n = e->xattr_names + off;
      if (strcmp (n, name) == 0)
        return true;
      off += (uint32_t) strlen (n) + 1;
    }
  return false;
}

/* Runs FN on the cached entry for PATH under the cache lock; -1 with errno otherwise. */
#define WITH_ENTRY(l, path, e, body)                                                                   \
  do                                                                                                   \
    {                                                                                                  \
      char norm_[PATH_MAX];                                                                            \
      const struct cached_entry *e;                                                                    \
      int saved_;                                                                                      \
      if (normalize_path ((path), norm_, sizeof (norm_)) < 0)                                          \
        return -1;                                                                                     \
      pthread_mutex_lock (&state.cache_lock);                                                          \
      e = find_entry (layer_of (l), norm_);                                                            \
      if (e == NULL)                                                                                   \
        ret = -1;                                                                                      \
      else                                                                                             \
        {                                                                                              \
          body;                                                                                        \
        }                                                                                              \
      saved_ = errno;                                                                                  \
      pthread_mutex_unlock (&state.cache_lock);                                                        \
      errno = saved_;                                                                                  \
    }                                                                                                  \
  while (0)

/* ---- The data source ---- */

#ifndef STATX_TYPE
#define STATX_TYPE 0x0001U
#endif

/* Forgets that the last call was load_dir's directory probe: any other call between
 * that statat and an opendir means the opendir is not load_dir's (see crfs_opendir). */
static void
forget_dir_probe (void)
{
  pthread_mutex_lock (&state.cache_lock);
  state.dir_probe = false;
  pthread_mutex_unlock (&state.cache_lock);
}

static void drop_streams (struct crfs_layer *cl);


static int
crfs_num_of_layers (const char *opaque, const char *path)
{
  uint64_t nums[CRFS_MAX_LAYERS];
  int n = key_layers (opaque, nums, CRFS_MAX_LAYERS);

  trace ("num_of_layers(%s, %s) = %d", opaque, path, n);
  return n;
}

static int
crfs_load_data_source (struct ovl_layer *l, const char *opaque, const char *path, int n_layer)
{
  uint64_t nums[CRFS_MAX_LAYERS];
  struct crfs_layer *cl;
  int n, fd, ret;
  dev_t dev;

  n = key_layers (opaque, nums, CRFS_MAX_LAYERS);
  if (n < 0)
    return -1;
  if (n_layer < 0 || n_layer >= n)
    {
      fprintf (stderr, "crfs: %s has %d layers, not %d\n", opaque, n, n_layer + 1);
      errno = EINVAL;
      return -1;
    }
  cl = calloc (1, sizeof (*cl));
  if (cl == NULL)
    return -1;
  cl->num = nums[n_layer];
  cl->ovl = l;

  pthread_mutex_lock (&state.lock);
  ret = connect_locked ();
  if (ret == 0)
    ret = root_fd_locked (cl->num, &fd, &dev);
  if (ret == 0)
    {
      cl->dev = dev;
      l->fd = fd;
      cl->next = state.layers;
      state.layers = cl;
    }
  pthread_mutex_unlock (&state.lock);
  if (ret < 0)
    {
      int saved = errno;
      fprintf (stderr, "crfs: cannot load layer %d of %s: %s\n", n_layer, opaque, strerror (saved));
      free (cl);
      errno = saved;
      return -1;
    }
  l->path = strdup (path ? path : "");
  l->data_source_private_data = cl;
  trace ("load_data_source(%s, %s, %d) = layer %llu fd %d", opaque, path, n_layer, (unsigned long long) cl->num,
         l->fd);
  return 0;
}

static int
crfs_cleanup (struct ovl_layer *l)
{
  struct crfs_layer *cl = layer_of (l), **it;
  bool found = false;

  /* Only free what is still ours: plugin_release may have run first. */
  pthread_mutex_lock (&state.cache_lock);
  pthread_mutex_lock (&state.lock);
  for (it = &state.layers; *it; it = &(*it)->next)
    if (*it == cl)
      {
        *it = cl->next;
        found = true;
        break;
      }
  pthread_mutex_unlock (&state.lock);
  if (found)
    {
      drop_streams (cl);
      ahead_forget_layer (cl);
      free_layer (cl);
    }
  if (state.dir_probe_layer == l)
    state.dir_probe = false;
  pthread_mutex_unlock (&state.cache_lock);
  l->data_source_private_data = NULL;
  return 0;
}

static int
crfs_file_exists (struct ovl_layer *l, const char *pathname)
{
  int ret = 0;

  forget_dir_probe ();

  WITH_ENTRY (l, pathname, e, (void) e; ret = 0);
  trace ("file_exists(%s) = %d errno %d", pathname, ret, ret < 0 ? errno : 0);
  return ret;
}

/* Fills the whole struct: callers pass uninitialised stack memory. */
static void
fill_stat (const uint64_t v[CRFS_STAT_FIELDS], dev_t dev, struct stat *st)
{
  memset (st, 0, sizeof (*st));
  st->st_dev = dev;
  st->st_ino = (ino_t) v[0];
  st->st_mode = (mode_t) v[1];
  st->st_nlink = (nlink_t) v[2];
  st->st_uid = (uid_t) v[3];
  st->st_gid = (gid_t) v[4];
  st->st_size = (off_t) v[5];
  st->st_mtim.tv_sec = (time_t) (v[6] / 1000000000ull);
  st->st_mtim.tv_nsec = (long) (v[6] % 1000000000ull);
  st->st_atim = st->st_mtim;
  st->st_ctim = st->st_mtim;
  st->st_rdev = makedev ((unsigned) v[7], (unsigned) v[8]);
  st->st_blksize = 4096;
  st->st_blocks = (blkcnt_t) ((v[5] + 511) / 512);
}

static int
crfs_statat (struct ovl_layer *l, const char *path, struct stat *st, int flags, unsigned int mask)
{
  int ret = 0;

  (void) flags; /* always AT_SYMLINK_NOFOLLOW: layers never follow symlinks */
  forget_dir_probe ();
  /* The answer is complete whatever the mask; STATX_TYPE alone on a directory is how
   * load_dir asks right before it opens the directory to list it. */
  WITH_ENTRY (l, path, e, {
    fill_stat (e->st, layer_of (l)->dev, st);
    ret = 0;
    if (mask == STATX_TYPE && S_ISDIR (e->st[1]))
      {
        state.dir_probe = true;
        state.dir_probe_layer = l;
        strcpy (state.dir_probe_path, norm_);
      }
  });
  trace ("statat(%s, 0x%x) = %d errno %d", path, mask, ret, ret < 0 ? errno : 0);
  return ret;
}

static int
crfs_fstat (struct ovl_layer *l, int fd, const char *path, unsigned int mask, struct stat *st)
{
  (void) fd; /* an fd this layer opened for PATH: the index answers for it */
  return crfs_statat (l, path, st, AT_SYMLINK_NOFOLLOW, mask);
}

/* Opens NORM on the worker's view through the layer's root fd, without a round trip.
 * No symlink is followed and nothing outside the layer is reachable (openat2). */
static int
view_open (struct ovl_layer *l, const char *norm, int flags)
{
#ifdef SYS_openat2
  struct open_how how;

  memset (&how, 0, sizeof (how));
  how.flags = (uint64_t) ((flags & (O_NONBLOCK | O_DIRECTORY | O_PATH | O_LARGEFILE)) | O_RDONLY | O_NOFOLLOW
                          | O_CLOEXEC);
  how.resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV;
  return (int) syscall (SYS_openat2, l->fd, *norm ? norm : ".", &how, sizeof (how));
#else
  (void) l;
  (void) norm;
  (void) flags;
  errno = ENOSYS;
  return -1;
#endif
}

/* Errors of a local view open that the worker can still answer: no openat2, a device
 * (the view is nodev: the worker gives a stand-in), a dead view (the worker restarts; a
 * lookup in flight when the worker died fails with EIO rather than ENOTCONN). */
static bool
worker_may_answer (int err, int flags)
{
  return err == ENOSYS || err == EACCES || err == EPERM || err == ENXIO || err == ENOTCONN
         || err == ECONNABORTED || err == EIO || (err == ELOOP && (flags & O_PATH));
}

/* Asks the worker for a real fd on NORM (a cache file, the view, or a stand-in). */
static int
worker_open (struct ovl_layer *l, const char *norm, int flags)
{
  struct request q;
  struct reply r;
  int ret, fd = -1;

  req_path (&q, "open", l, norm, 1);
  req_int (&q, "flags", flags);
  reply_init (&r);
  ret = call (&q, &r);
  if (ret == 0 && r.fd < 0)
    {
      errno = EPROTO;
      ret = -1;
    }
  if (ret == 0)
    fd = reply_take_fd (&r);
  reply_free (&r);
  return ret < 0 ? -1 : fd;
}

static int
open_fd (struct ovl_layer *l, const char *path, int flags)
{
  char norm[PATH_MAX];
  int fd;

  if (normalize_path (path, norm, sizeof (norm)) < 0)
    return -1;
  /* Opens that only look (lookups read xattrs, O_DIRECTORY, O_PATH) go straight to the
   * view: they fetch nothing. Reads of file data ask the worker, which may hand out a
   * verified copy from the content cache instead. */
  if (flags & (O_NONBLOCK | O_DIRECTORY | O_PATH))
    {
      fd = view_open (l, norm, flags);
      if (fd >= 0 || ! worker_may_answer (errno, flags))
        return fd;
    }
  return worker_open (l, norm, flags);
}

/* A real DIR * on FD, or NULL with errno (FD closed). */
static DIR *
dir_stream (int fd)
{
  DIR *dp = fdopendir (fd);

  if (dp == NULL)
    {
      int saved = errno;
      close (fd);
      errno = saved;
    }
  return dp;
}

/* Unlinks and returns the listing stream of DIRP, if it is one. cache_lock held. */
static struct listing_stream *
take_stream (DIR *dirp)
{
  struct listing_stream **it;

  for (it = &state.streams; *it; it = &(*it)->next)
    if ((*it)->dir == dirp)
      {
        struct listing_stream *s = *it;
        *it = s->next;
        return s;
      }
  return NULL;
}

static void
free_stream (struct listing_stream *s)
{
  free (s->path);
  free (s);
}

/* A stream entry for DIRP, if any, is stale: DIRP was just allocated, so that stream's
 * DIR was freed behind our back and its address reused. Defensive only: listing streams
 * go to load_dir, which closes them with ds->closedir (see crfs_opendir), and no
 * fuse-overlayfs 1.10-1.16 path frees one with libc closedir. cache_lock held. */
static void
forget_stale_stream_locked (DIR *dirp)
{
  struct listing_stream *s = take_stream (dirp);

  if (s)
    free_stream (s);
}

static void
forget_stale_stream (DIR *dirp)
{
  pthread_mutex_lock (&state.cache_lock);
  forget_stale_stream_locked (dirp);
  pthread_mutex_unlock (&state.cache_lock);
}

/* A new fd of a directory that no longer exists (made in our private runtime directory
 * and removed at once): fdopendir accepts it (newer glibc refuses O_PATH fds) and getdents
 * on it fails with ENOENT, which glibc reports as the end: it never lists anything, and
 * it costs no request on the worker's view. cache_lock held. */
static int
dead_dir_fd (void)
{
  char dir[PATH_MAX], tmpl[PATH_MAX];

  if (state.dead_dir < 0)
    {
      if (runtime_dir (dir, sizeof (dir)) < 0)
        return -1;
      if (snprintf (tmpl, sizeof (tmpl), "%s/dead-dir.XXXXXX", dir) >= (int) sizeof (tmpl))
        {
          errno = ENAMETOOLONG;
          return -1;
        }
      if (mkdtemp (tmpl) == NULL)
        return -1;
      state.dead_dir = open (tmpl, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
      if (rmdir (tmpl) < 0 && state.dead_dir >= 0)
        {
          close (state.dead_dir); /* still alive: it could list something */
          state.dead_dir = -1;
          errno = EEXIST;
        }
      if (state.dead_dir < 0)
        return -1;
    }
  return fcntl (state.dead_dir, F_DUPFD_CLOEXEC, 0);
}

/* load_dir's stream of NORM (a directory of this layer, just probed): a real DIR * on a
 * removed directory; its entries come from the cached listing through crfs_readdir.
 * NULL with errno EAGAIN: use the view instead. Called with cache_lock held. */
static DIR *
listing_opendir (struct ovl_layer *l, const char *norm)
{
  struct crfs_layer *cl = layer_of (l);
  struct listing_stream *s;
  struct cached_dir *d;
  int fd;

  /* A listing that cannot be fetched now (the worker lost, no new one answering yet)
   * still gets a stream: load_dir SKIPS a layer whose opendir fails and keeps the
   * directory without its entries (ENOENT for good), while a readdir that fails makes
   * it drop the listing and fail the lookup. listing_next fetches again. */
  d = get_dir (cl, norm);
  if (d == NULL)
    trace ("listing of %s deferred to readdir: %s", norm, strerror (errno));
  else if (d->error)
    {
      errno = d->error;
      return NULL;
    }
  else
    {
      ahead_want_subdirs (cl, d);
      ahead_send ();
    }
  s = calloc (1, sizeof (*s));
  if (s == NULL)
    return NULL;
  s->path = strdup (norm);
  fd = s->path ? dead_dir_fd () : -1;
  if (s->path == NULL || fd < 0 || (s->dir = dir_stream (fd)) == NULL)
    {
      trace ("no listing stream for %s: %s", norm, strerror (errno));
      free (s->path);
      free (s);
      errno = EAGAIN;
      return NULL;
    }
  s->cl = cl;
  forget_stale_stream_locked (s->dir);
  s->next = state.streams;
  state.streams = s;
  return s->dir;
}

/* Every DIR * is real: fuse-overlayfs lists with ds->readdir in load_dir, but when a
 * directory is renamed over a whiteout (create_missing_whiteouts) it calls libc
 * readdir/closedir on what ds->opendir returned, and that stream must list the layer.
 * In fuse-overlayfs 1.10 to 1.16 load_dir probes a directory with statat, mask
 * STATX_TYPE alone, and calls opendir on the same layer and path right after it; all ds
 * calls run under one lock, so nothing comes between. No other opendir follows such a
 * statat directly (load_dir's other STATX_TYPE statat, of a child of unknown type, is
 * followed by readdir or openat; create_missing_whiteouts opens after reload_dir, which
 * ends with getxattr or closedir). So only an opendir that follows that probe at once is
 * served from the listing (saving the view an opendir, two readdirs and a releasedir per
 * directory); any other gets a stream of the worker's view. */
static void *
crfs_opendir (struct ovl_layer *l, const char *path)
{
  char norm[PATH_MAX];
  DIR *dp = NULL;
  bool probed;
  int fd;

  if (normalize_path (path, norm, sizeof (norm)) < 0)
    return NULL;
  pthread_mutex_lock (&state.cache_lock);
  probed = state.dir_probe && state.dir_probe_layer == l && strcmp (state.dir_probe_path, norm) == 0;
  state.dir_probe = false;
  if (probed)
    {
      dp = listing_opendir (l, norm);
      trace ("opendir(%s) from the listing: %p", path, (void *) dp);
      probed = dp != NULL || errno != EAGAIN;
    }
  pthread_mutex_unlock (&state.cache_lock);
  if (probed)
    return dp;
  fd = open_fd (l, path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  trace ("opendir(%s) fd %d", path, fd);
  if (fd < 0)
    return NULL;
  dp = dir_stream (fd);
  if (dp != NULL)
    forget_stale_stream (dp);
  return dp;
}

static struct listing_stream *
find_stream (DIR *dirp)
{
  struct listing_stream *s;

  for (s = state.streams; s; s = s->next)
    if (s->dir == dirp)
      return s;
  return NULL;
}

/* The next entry of S from its directory's listing (fetched again if the cache was
 * flushed since: a listing never changes, so positions stay valid). cache_lock held. */
static struct dirent *
listing_next (struct listing_stream *s)
{
  struct cached_dir *d = get_dir (s->cl, s->path);
  const struct cached_entry *e;

  if (d == NULL)
    return NULL;
  if (d->error)
    {
      errno = d->error;
      return NULL;
    }
  /* A name no dirent can hold cannot be looked up either. */
  while (s->pos < d->count && strlen (d->entries[s->pos].name) >= sizeof (s->ent.d_name))
    s->pos++;
  if (s->pos >= d->count)
    return NULL; /* the end: errno untouched */
  e = &d->entries[s->pos++];
  memset (&s->ent, 0, offsetof (struct dirent, d_name));
  s->ent.d_ino = (ino_t) e->st[0];
  s->ent.d_off = (off_t) s->pos;
  s->ent.d_reclen = sizeof (s->ent);
  s->ent.d_type = (unsigned char) IFTODT (e->st[1]);
  strcpy (s->ent.d_name, e->name);
  return &s->ent;
}

static struct dirent *
crfs_readdir (void *dirp)
{
  struct listing_stream *s;
  struct dirent *dent;
  int saved = errno;

  pthread_mutex_lock (&state.cache_lock);
  state.dir_probe = false;
  s = find_stream ((DIR *) dirp);
  if (s == NULL)
    {
      pthread_mutex_unlock (&state.cache_lock);
      return readdir ((DIR *) dirp);
    }
  errno = saved;
  dent = listing_next (s);
  saved = errno;
  pthread_mutex_unlock (&state.cache_lock);
  errno = saved;
  return dent;
}

static int
crfs_closedir (void *dirp)
{
  struct listing_stream *s;

  pthread_mutex_lock (&state.cache_lock);
  state.dir_probe = false;
  s = take_stream ((DIR *) dirp);
  pthread_mutex_unlock (&state.cache_lock);
  if (s)
    free_stream (s);
  return closedir ((DIR *) dirp);
}

/* Closes the listing streams of CL (all of them if CL is NULL). cache_lock held. */
static void
drop_streams (struct crfs_layer *cl)
{
  struct listing_stream **it = &state.streams;

  while (*it)
    {
      struct listing_stream *s = *it;
      if (cl != NULL && s->cl != cl)
        {
          it = &s->next;
          continue;
        }
      *it = s->next;
      closedir (s->dir);
      free_stream (s);
    }
}

/* fuse-overlayfs (1.10 to 1.16) opens with exactly these flags and mode in two places:
 * make_ovl_node, on every lookup without fast_ino=1, only to fgetxattr the origin
 * attributes (trusted.overlay.origin, user.fuseoverlayfs.origin) from the fd - when the
 * open fails it takes the same answer from statat and treats the entry as having no
 * origin; and ovl_copy_file_range, which replies our errno to the kernel, and the
 * kernel answers ENOSYS by copying through ordinary reads instead. So for an entry
 * without origin attributes, failing such an open with ENOSYS is exact for both, and
 * spares the worker's view an open, two getxattr and a release per entry (an entry the
 * listing does not have fails with ENOENT, as the open would). */
#define LOOKUP_OPEN_FLAGS (O_RDONLY | O_NONBLOCK | O_NOFOLLOW)
#define LOOKUP_OPEN_MODE 0755

/* For a lookup open of PATH: 1 when the entry is known to carry no origin attribute,
 * -1 with errno ENOENT/ENOTDIR when this layer's listing says it is absent, 0 otherwise
 * (an origin attribute, a bad path, a worker that cannot answer: the ordinary open). */
static int
lookup_open_answer (struct ovl_layer *l, const char *path)
{
  char norm[PATH_MAX];
  const struct cached_entry *e;
  int answer = 0, err = 0;

  if (normalize_path (path, norm, sizeof (norm)) < 0)
    return 0;
  pthread_mutex_lock (&state.cache_lock);
  e = find_entry (layer_of (l), norm);
  if (e != NULL)
    answer = ! has_xattr (e, "trusted.overlay.origin") && ! has_xattr (e, "user.fuseoverlayfs.origin");
  else if (errno == ENOENT || errno == ENOTDIR)
    {
      answer = -1;
      err = errno;
    }
  pthread_mutex_unlock (&state.cache_lock);
  errno = err;
  return answer;
}

static int
crfs_openat (struct ovl_layer *l, const char *path, int flags, mode_t mode)
{
  int fd;

  forget_dir_probe ();
  /* O_TMPFILE includes O_DIRECTORY's bit: compare the whole mask. */
  if ((flags & O_ACCMODE) != O_RDONLY || (flags & (O_CREAT | O_TRUNC)) || (flags & O_TMPFILE) == O_TMPFILE)
    {
      errno = EROFS;
      return -1;
    }
  if (flags == LOOKUP_OPEN_FLAGS && mode == LOOKUP_OPEN_MODE)
    {
      int answer = lookup_open_answer (l, path);
      if (answer != 0)
        {
          if (answer > 0)
            errno = ENOSYS;
          trace ("openat(%s, 0%o, 0%o) = -1 errno %d lookup open answered without an fd", path, flags, mode,
                 errno);
          return -1;
        }
    }
  fd = open_fd (l, path, flags);
  trace ("openat(%s, 0%o, 0%o) = %d errno %d", path, flags, mode, fd, fd < 0 ? errno : 0);
  return fd;
}

static int
crfs_listxattr (struct ovl_layer *l, const char *path, char *buf, size_t size)
{
  int ret = 0;

  forget_dir_probe ();

  WITH_ENTRY (l, path, e, {
    if (size > 0 && size < e->xattr_len)
      {
        errno = ERANGE;
        ret = -1;
      }
    else
      {
        if (size > 0 && e->xattr_len > 0)
          memcpy (buf, e->xattr_names, e->xattr_len);
        ret = (int) e->xattr_len;
      }
  });
  trace ("listxattr(%s, %zu) = %d", path, size, ret);
  return ret;
}

static int
fetch_xattr (struct ovl_layer *l, const char *norm, const char *name, char *buf, size_t size)
{
  struct request q;
  struct reply r;
  const char *value = NULL;
  uint32_t len = 0;
  int ret;

  req_path (&q, "getxattr", l, norm, 1);
  req_bin (&q, "name", name);
  reply_init (&r);
  ret = call (&q, &r);
  if (ret == 0 && ! reply_bytes (&r, "value", &value, &len))
    {
      errno = EPROTO;
      ret = -1;
    }
  if (ret == 0 && len > INT_MAX)
    {
      errno = E2BIG;
      ret = -1;
    }
  if (ret == 0 && size > 0 && size < len)
    {
      errno = ERANGE;
      ret = -1;
    }
  if (ret == 0 && size > 0)
    memcpy (buf, value, len);
  reply_free (&r);
  return ret < 0 ? -1 : (int) len;
}

static int
crfs_getxattr (struct ovl_layer *l, const char *path, const char *name, char *buf, size_t size)
{
  int ret = 0;

  forget_dir_probe ();

  /* Most questions (security.selinux, posix ACLs, overlay opaque markers) are about
   * attributes the entry does not have: the cached name list answers those. */
  WITH_ENTRY (l, path, e, {
    if (! has_xattr (e, name))
      {
        errno = ENODATA;
        ret = -1;
      }
    else
      ret = fetch_xattr (l, norm_, name, buf, size);
  });
  trace ("getxattr(%s, %s, %zu) = %d errno %d", path, name, size, ret, ret < 0 ? errno : 0);
  return ret;
}

/* The cached entry of symlink NORM, its directory fetched if need be; NULL with errno
 * (EINVAL: not a symlink). cache_lock held. */
static struct cached_entry *
link_entry (struct crfs_layer *cl, const char *norm)
{
  struct cached_entry *e;

  if (find_entry (cl, norm) == NULL)
    return NULL;
  e = cached_link (cl, norm);
  if (e == NULL)
    errno = EINVAL;
  return e;
}

/* Reads symlink NORM's target from the worker into E. cache_lock held. */
static int
fetch_target (struct crfs_layer *cl, const char *norm, struct cached_entry *e)
{
  struct request q;
  struct reply r;
  int ret;

  link_request (&q, cl, norm);
  reply_init (&r);
  ret = call (&q, &r);
  if (ret == 0)
    ret = keep_target (cl, e, &r);
  reply_free (&r);
  trace ("readlink(%llu, %s) = %d", (unsigned long long) cl->num, norm, ret);
  return ret;
}

/* Targets are kept with the listing: a symlink is read from the worker once. */
static ssize_t
crfs_readlinkat (struct ovl_layer *l, const char *path, char *buf, size_t bufsiz)
{
  struct crfs_layer *cl = layer_of (l);
  struct cached_entry *e;
  char norm[PATH_MAX];
  ssize_t ret = -1;
  int saved;

  forget_dir_probe ();
  if (normalize_path (path, norm, sizeof (norm)) < 0)
    return -1;
  pthread_mutex_lock (&state.cache_lock);
  e = link_entry (cl, norm);
  if (e != NULL && e->target == NULL && ahead_position (cl, norm) >= 0)
    {
      ahead_take (cl, norm);
      e = link_entry (cl, norm); /* taking replies can flush the cache */
    }
  if (e != NULL && e->target == NULL)
    {
      if (fetch_target (cl, norm, e) < 0)
        e = NULL;
      else
        ahead_links (cl, norm);
    }
  if (e != NULL)
    {
      /* readlink truncates silently; the caller retries with a bigger buffer */
      ret = (ssize_t) (e->target_len < bufsiz ? e->target_len : bufsiz);
      memcpy (buf, e->target, (size_t) ret);
    }
  saved = errno;
  ahead_send ();
  pthread_mutex_unlock (&state.cache_lock);
  trace ("readlinkat(%s) = %d", path, (int) ret);
  errno = saved;
  return ret;
}

static bool
crfs_support_acls (struct ovl_layer *l)
{
  (void) l;
  return false;
}

static struct data_source crfs_data_source = {
  .num_of_layers = crfs_num_of_layers,
  .load_data_source = crfs_load_data_source,
  .cleanup = crfs_cleanup,
  .file_exists = crfs_file_exists,
  .statat = crfs_statat,
  .fstat = crfs_fstat,
  .opendir = crfs_opendir,
  .readdir = crfs_readdir,
  .closedir = crfs_closedir,
  .openat = crfs_openat,
  .listxattr = crfs_listxattr,
  .getxattr = crfs_getxattr,
  .readlinkat = crfs_readlinkat,
  .support_acls = crfs_support_acls,
};

/* ---- Exported symbols ---- */

EXPORT int
plugin_version (void)
{
  return 1;
}

EXPORT const char *
plugin_name (void)
{
  return "crfs";
}

EXPORT struct data_source *
plugin_load (const char *opaque, const char *path)
{
  trace ("plugin_load(%s, %s)", opaque ? opaque : "", path ? path : "");
  if (! valid_key (opaque))
    {
      fprintf (stderr, "crfs: invalid layer key '%s' (no ':', ',' or '/')\n", opaque ? opaque : "");
      return NULL;
    }
  return &crfs_data_source;
}

EXPORT int
plugin_release (void)
{
  pthread_mutex_lock (&state.cache_lock);
  pthread_mutex_lock (&state.lock);
  disconnect_locked ();
  drop_streams (NULL);
  ahead_drop_all ();
  state.dir_probe = false;
  if (state.dead_dir >= 0)
    close (state.dead_dir);
  state.dead_dir = -1;
  while (state.layers)
    {
      /* The ovl_layer structs may be freed already: do not touch them. */
      struct crfs_layer *next = state.layers->next;
      free_layer (state.layers);
      state.layers = next;
    }
  if (state.log)
    fclose (state.log);
  state.log = NULL;
  state.log_checked = false;
  pthread_mutex_unlock (&state.lock);
  pthread_mutex_unlock (&state.cache_lock);
  return 0;
}
