"""`crfs optimize SRC DST -- CMD...`: an eStargz image laid out for one workload.

1. SRC is mounted lazily (`crfs mount`); a SRC whose layers carry no TOC digest (plain
   gzip/zstd/tar) is first converted to a temporary eStargz OCI layout.
2. The worker records every regular file the workload opens for its data (accesslog.py),
   while CMD runs chrooted into the read-only mount, in private mount and PID namespaces
   (and a user namespace mapping us to root when we are not root), with /dev bound and
   /proc mounted when the image has those directories.
3. Each recorded file is prioritised, in first-access order, in the layer the workload
   read it from (fuse-overlayfs opens the uppermost copy), and the mounted image is
   converted to DST: every layer is rewritten, eStargz ones included, so that the files
   precede `.prefetch.landmark` and a mount of DST prefetches them in one range.
A workload that exits non-zero is an error unless `allow_failure`.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from .convert import ConvertOptions, ConvertResult, _Conversion, convert
from .errors import CrfsError, InvalidReferenceError
from .estargz_writer import PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK, EstargzOptions
from .image import layer_descriptors, select_manifest
from .imagemount import mount_image, unmount_image
from .imagestore import ImageLocation, open_location
from .progress import Progress
from .registry import RegistryClient

WORKLOAD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Runs in the new namespaces: optional /dev and /proc, then the workload, chrooted.
_ENTER_SCRIPT = (
    'root=$1; shift; '
    '[ -d "$root/dev" ] && mount --rbind /dev "$root/dev" 2>/dev/null; '
    '[ -d "$root/proc" ] && mount -t proc proc "$root/proc" 2>/dev/null; '
    'cd "$root" && exec chroot "$root" "$@"'
)


class WorkloadError(CrfsError):
    """The workload could not run, or failed."""


@dataclass(frozen=True)
class OptimizeOptions:
    estargz: EstargzOptions = field(default_factory=EstargzOptions)
    allow_failure: bool = False     # keep going when the workload exits non-zero
    work_dir: Path | None = None    # the temporary eStargz layout and the mount point
    progress: Progress = field(default_factory=Progress.for_terminal)


@dataclass(frozen=True)
class RecordedFile:
    path: str          # in the merged tree (and in the layer: overlay lowers share paths)
    layer: str         # the layer's digest in DST
    source_layer: str  # the layer's digest in the image the workload ran on


@dataclass(frozen=True)
class OptimizeResult:
    convert: ConvertResult
    exit_status: int
    recorded: tuple[RecordedFile, ...]   # in first-access order
    ignored: int                         # opens in layers of other images (other mounts)


def optimize(src: str, dst: str, command: Sequence[str],
             options: OptimizeOptions | None = None) -> OptimizeResult:
    """Runs `command` on `src` through crfs and writes `dst` with what it opened first."""
    options = options or OptimizeOptions()
    if not command:
        raise WorkloadError("no workload command given (crfs optimize SRC DST -- CMD...)")
    with tempfile.TemporaryDirectory(dir=options.work_dir, prefix="crfs-optimize-") as text:
        work = Path(text)
        lazy = _lazy_image(src, work, options)
        layers = _layer_digests(lazy)
        opens, status = _record_workload(lazy, work / "root", command)
        if status != 0 and not options.allow_failure:
            raise WorkloadError(f"the workload {' '.join(command)!r} on {src} exited with status {status} "
                                f"(--allow-failure keeps going)")
        kept = [(digest, path) for digest, path in opens
                 if digest in layers and path not in (PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK)]
        plan: dict[str, list[str]] = {}
        for digest, path in kept:
            plan.setdefault(digest, []).append(path)
        result = _convert_prioritized(lazy, dst, plan, options, work)
    new_digest = {layer.source_digest: layer.digest for layer in result.layers}
    recorded = tuple(RecordedFile(path, new_digest.get(digest, digest), digest) for digest, path in kept)
    ignored = sum(1 for digest, _path in opens if digest not in layers)
    return OptimizeResult(result, status, recorded, ignored)


# ---------------------------------------------------------------------------- the image to run


def _with_client(reference: str, action: Any) -> Any:
    if reference.startswith("oci:"):
        return action(None)
    with RegistryClient() as client:
        return action(client)


def _selected_layers(location: ImageLocation, name: str) -> list[Any]:
    _manifest, doc = select_manifest(location.store, location.target, None, name)
    return layer_descriptors(doc, name)


def _is_lazy(reference: str) -> bool:
    """Whether every layer of the image (this machine's platform) carries a TOC digest."""
    return _with_client(reference, lambda client: all(
        layer.toc_digest is not None for layer in _selected_layers(open_location(reference, client), reference)))


def _lazy_image(src: str, work: Path, options: OptimizeOptions) -> str:
    """SRC itself if crfs can mount it lazily, else a temporary eStargz copy."""
    if _is_lazy(src):
        return src
    lazy = f"oci:{work / 'lazy'}:latest"
    convert(src, lazy, ConvertOptions(estargz=replace(options.estargz, prioritized_files=()),
                                      work_dir=work, progress=options.progress))
    return lazy


def _layer_digests(reference: str) -> set[str]:
    return _with_client(reference, lambda client: {
        layer.digest for layer in _selected_layers(open_location(reference, client), reference)})


# ---------------------------------------------------------------------------- the workload


def workload_argv(root: Path, command: Sequence[str]) -> list[str]:
    """CMD chrooted into `root`, in private namespaces (a user namespace when not root)."""
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    return ["unshare", *user, "--mount", "--propagation", "private", "--pid", "--fork",
            "/bin/sh", "-c", _ENTER_SCRIPT, "crfs-optimize", str(root), *command]


def _run_workload(root: Path, command: Sequence[str]) -> int:
    env = {"PATH": WORKLOAD_PATH, "HOME": "/root", "TERM": os.environ.get("TERM", "dumb")}
    try:
        return subprocess.run(workload_argv(root, command), env=env, stdin=subprocess.DEVNULL,
                              check=False).returncode
    except OSError as exc:
        raise WorkloadError(f"cannot run the workload: {exc.strerror}") from None


def _record_workload(reference: str, root: Path, command: Sequence[str]) -> tuple[list[tuple[str, str]], int]:
    """Mounts the image, runs the workload on it while the worker records, unmounts.
    Returns the opens as (layer digest, path) in first-access order, and the exit status."""
    from .worker import connect  # the worker stack loads only here

    root.mkdir()
    mount_image(reference, root)
    try:
        with connect() as client:
            ident = client.call("record_start").fields["id"]
            status = _run_workload(root, command)
            rows = client.call("record_stop", id=ident).fields["opens"]
    finally:
        unmount_image(root)
    opens = [(str(digest), os.fsdecode(path)) for _num, path, digest, _location in rows if digest]
    return opens, status


# ---------------------------------------------------------------------------- the conversion


def _convert_prioritized(src: str, dst: str, plan: dict[str, list[str]], options: OptimizeOptions,
                         work: Path) -> ConvertResult:
    def run(client: RegistryClient | None) -> ConvertResult:
        source = open_location(src, client)
        dest = open_location(dst, client, create=True)
        if dest.target is not None and dest.tag is None:
            raise InvalidReferenceError(f"{dst}: a destination needs a tag, not a digest")
        convert_options = ConvertOptions(
            estargz=replace(options.estargz, require_prioritized=False, prioritized_files=()),
            work_dir=work, progress=options.progress,
            prioritized_by_layer={digest: tuple(files) for digest, files in plan.items()})
        return _Conversion(source, dest, convert_options, work).run()

    if src.startswith("oci:") and dst.startswith("oci:"):
        return run(None)
    with RegistryClient() as client:
        return run(client)


# ---------------------------------------------------------------------------- CLI


def add_parser(sub: Any) -> None:
    """`crfs optimize SRC DST [options] -- CMD...`"""
    opt = sub.add_parser("optimize", help="run a workload on an image and write an eStargz image "
                                          "that prefetches what it opened",
                         description="SRC and DST: registry references or oci:DIR:TAG. CMD runs "
                                     "chrooted into SRC's merged tree, mounted through crfs.")
    opt.add_argument("src")
    opt.add_argument("dst")
    opt.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD...")
    opt.add_argument("--allow-failure", action="store_true",
                     help="write DST even when the workload exits non-zero")
    opt.add_argument("--chunk-size", type=int, default=EstargzOptions().chunk_size,
                     help="split files into chunks of this many bytes (default %(default)s)")
    opt.add_argument("--compression-level", type=int, choices=range(0, 10), metavar="0-9",
                     default=EstargzOptions().compression_level, help="gzip level (default %(default)s)")
    opt.set_defaults(run=run_optimize)


def run_optimize(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    options = OptimizeOptions(
        estargz=EstargzOptions(chunk_size=args.chunk_size, compression_level=args.compression_level),
        allow_failure=args.allow_failure)
    result = optimize(args.src, args.dst, command, options)
    layers = sorted({r.layer for r in result.recorded})
    print(f"{len(result.recorded)} file(s) recorded in {len(layers)} layer(s)"
          + (f", workload exit status {result.exit_status}" if result.exit_status else ""))
    for recorded in result.recorded:
        print(f"  /{recorded.path}  -> {recorded.layer}")
    if result.ignored:
        print(f"  ({result.ignored} open(s) in other images' layers ignored)")
    print(f"{result.convert.reference}@{result.convert.digest}")
    return 0
