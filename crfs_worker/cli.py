"""The `crfs` command. Every CrfsError becomes one line on stderr and exit status 1."""
from __future__ import annotations

import argparse
import json
import os
import posixpath
import stat as stat_module
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Iterator

from .convert import ConvertOptions, convert
from .dirs import index_dir
from .errors import CrfsError, VerificationError
from .estargz_writer import EstargzOptions
from .blob import LocalBlob
from .image import Image, open_image
from .layer import EntryStat, Layer, LayerSource
from .layerkeys import lowerdir_for
from . import imagemount, optimize, worker

MAX_SYMLINK_HOPS = 40               # as the kernel's ELOOP limit
CAT_ATOMIC_LIMIT = 64 << 20         # files up to this size are verified whole before any output
CAT_PIECE = 4 << 20


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    factor = units.get(text[-1:], 1)
    digits = text[:-1] if text[-1:] in units else text
    try:
        value = int(digits) * factor
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 4MiB, 65536)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("a size must be positive")
    return value


def _add_layer_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--toc-digest", metavar="sha256:...",
                        help="for a local blob FILE: the digest that vouches for its TOC")
    parser.add_argument("--allow-unverified", action="store_true",
                        help="accept content nothing vouches for (legacy stargz TOCs)")
    parser.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                        help="which image of a multi-platform index (default: this machine's)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crfs", description="Container-Registry Filesystem")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    conv = sub.add_parser("convert", help="convert an image to eStargz",
                          description="SRC and DST: registry references (HOST/REPO:TAG) or "
                                      "OCI layouts (oci:DIR:TAG)")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                      help="convert only this image of a multi-platform index")
    conv.add_argument("--chunk-size", type=_size, default=EstargzOptions().chunk_size,
                      help="split files into chunks of this size (default %(default)s)")
    conv.add_argument("--compression-level", type=int, choices=range(0, 10), metavar="0-9",
                      default=EstargzOptions().compression_level,
                      help="gzip level (default %(default)s)")
    conv.add_argument("--prioritize", type=Path, metavar="FILE",
                      help="file listing paths (one per line) to place before .prefetch.landmark")
    conv.set_defaults(run=run_convert)

    insp = sub.add_parser("inspect", help="list a layer's or image's entries like `tar tv`")
    insp.add_argument("target", metavar="REF|FILE")
    insp.add_argument("--json", action="store_true", help="one JSON document on stdout")
    _add_layer_options(insp)
    insp.set_defaults(run=run_inspect)

    cat = sub.add_parser("cat", help="write one file's verified bytes to stdout")
    cat.add_argument("target", metavar="REF|FILE")
    cat.add_argument("path")
    _add_layer_options(cat)
    cat.set_defaults(run=run_cat)

    low = sub.add_parser("lowerdir", help="print the fuse-overlayfs lowerdir entry for an image",
                         description="Registers the image with the worker and prints //crfs/KEY// "
                                     "for `fuse-overlayfs -o plugins=.../crfs.so,lowerdir=...`")
    low.add_argument("ref", metavar="REF")
    low.add_argument("--allow-unverified", action="store_true",
                     help="accept content nothing vouches for (legacy stargz TOCs)")
    low.set_defaults(run=run_lowerdir)

    stats = sub.add_parser("stats", help="per-layer counters of the running worker")
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(run=run_stats)

    mnt = sub.add_parser("mount", help="mount an image's merged tree read-only (no container runtime)",
                         description="fuse-overlayfs with the image's layers through crfs.so; files are "
                                     "fetched when first read")
    mnt.add_argument("ref", metavar="REF")
    mnt.add_argument("dir", metavar="DIR")
    mnt.add_argument("--allow-unverified", action="store_true",
                     help="accept content nothing vouches for (legacy stargz TOCs)")
    mnt.add_argument("-o", dest="options", metavar="OPTIONS", help="more fuse-overlayfs options")
    mnt.set_defaults(run=imagemount.run_mount)

    umnt = sub.add_parser("umount", help="unmount what `crfs mount` mounted")
    umnt.add_argument("dir", metavar="DIR")
    umnt.set_defaults(run=imagemount.run_umount)

    optimize.add_parser(sub)

    # Listed for --help; main() hands `crfs worker ...` to the worker's own parser.
    sub.add_parser("worker", help="run the worker in the foreground (crfs worker --help)")
    return parser


# ---------------------------------------------------------------- convert

def _read_prioritized(path: Path) -> tuple[str, ...]:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise CrfsError(f"--prioritize {path}: {exc.strerror}") from None
    return tuple(line.strip() for line in lines if line.strip() and not line.startswith("#"))


def run_convert(args: argparse.Namespace) -> int:
    prioritized = _read_prioritized(args.prioritize) if args.prioritize else ()
    options = ConvertOptions(
        estargz=EstargzOptions(chunk_size=args.chunk_size, compression_level=args.compression_level,
                               prioritized_files=prioritized),
        platform=args.platform,
    )
    result = convert(args.src, args.dst, options)
    for path in result.missing_prioritized:
        print(f"crfs: warning: --prioritize: {path}: in no layer of {args.src}", file=sys.stderr)
    converted = sum(1 for layer in result.layers if not layer.copied)
    print(f"{result.reference}@{result.digest} ({converted} layer(s) converted, "
          f"{len(result.layers) - converted} copied)")
    return 0


# ---------------------------------------------------------------- inspect / cat

def _open_target(args: argparse.Namespace, resources: ExitStack) -> Image | Layer:
    """A local blob file when `target` names an existing file, else an image reference."""
    target = args.target
    if os.path.isfile(target):
        blob = resources.enter_context(LocalBlob(Path(target)))
        source = LayerSource(blob, args.toc_digest, {}, args.allow_unverified)
        return resources.enter_context(Layer.open(source, index_dir()))
    if args.toc_digest:
        raise CrfsError("--toc-digest is for a local blob FILE; an image's manifest carries its digests")
    return resources.enter_context(open_image(
        target, index_dir(), platform_text=args.platform, allow_unverified=args.allow_unverified))


def _type_char(mode: int) -> str:
    for test, char in ((stat_module.S_ISDIR, "d"), (stat_module.S_ISLNK, "l"), (stat_module.S_ISCHR, "c"),
                       (stat_module.S_ISBLK, "b"), (stat_module.S_ISFIFO, "p")):
        if test(mode):
            return char
    return "-"


def _tar_tv_line(layer: Layer, path: str, st: EntryStat) -> str:
    size = f"{st.rdev_major},{st.rdev_minor}" if stat_module.S_ISCHR(st.mode) or stat_module.S_ISBLK(st.mode) \
        else str(st.size)
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(st.mtime_ns // 1_000_000_000))
    name = (path or ".") + ("/" if stat_module.S_ISDIR(st.mode) and path else "")
    if stat_module.S_ISLNK(st.mode):
        name += " -> " + layer.readlink(path)
    return f"{stat_module.filemode(st.mode)} {st.uid}/{st.gid} {size:>10} {when} {name}"


def _entry_json(layer: Layer, path: str, st: EntryStat) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "path": path, "type": _type_char(st.mode), "mode": stat_module.S_IMODE(st.mode),
        "uid": st.uid, "gid": st.gid, "size": st.size, "mtime_ns": st.mtime_ns,
        "ino": st.ino, "nlink": st.nlink,
    }
    if stat_module.S_ISLNK(st.mode):
        entry["link"] = layer.readlink(path)
    if stat_module.S_ISCHR(st.mode) or stat_module.S_ISBLK(st.mode):
        entry["rdev"] = [st.rdev_major, st.rdev_minor]
    names = layer.listxattr(path)
    if names:
        entry["xattrs"] = {n: layer.getxattr(path, n).hex() for n in names}
    return entry


def _layers_of(opened: Image | Layer) -> Iterator[tuple[str, Layer]]:
    if isinstance(opened, Image):
        for o in opened.layers:
            yield o.descriptor.digest, o.layer
    else:
        yield "", opened


def run_inspect(args: argparse.Namespace) -> int:
    out = sys.stdout
    with ExitStack() as resources:
        opened = _open_target(args, resources)
        if args.json:
            layers = [{"digest": digest or None, "format": layer.format, "toc_digest": layer.toc_digest,
                       "entries": [_entry_json(layer, p, st) for p, st in layer.walk()]}
                      for digest, layer in _layers_of(opened)]
            json.dump({"target": args.target, "layers": layers}, out, indent=1)
            out.write("\n")
            return 0
        for digest, layer in _layers_of(opened):
            if digest:
                out.write(f"# layer {digest} ({layer.format}, TOC {layer.toc_digest})\n")
            for path, st in layer.walk():
                out.write(_tar_tv_line(layer, path, st) + "\n")
    return 0


def _follow(resolve: Callable[[str], tuple[Layer, str]], path: str) -> tuple[Layer, str, EntryStat]:
    """Resolves symlinks (in the final component and in parents) inside the image, like cat(1)."""
    for _ in range(MAX_SYMLINK_HOPS):
        parts = [p for p in posixpath.normpath("/" + path).split("/") if p]
        for depth in range(1, len(parts) + 1):
            layer, rel = resolve("/".join(parts[:depth]))
            st = layer.stat(rel)
            if stat_module.S_ISLNK(st.mode):
                link = layer.readlink(rel)
                base = "/" if link.startswith("/") else "/" + "/".join(parts[:depth - 1])
                path = posixpath.join(base, link, *parts[depth:])
                break
            if depth == len(parts):
                return layer, rel, st
            if not stat_module.S_ISDIR(st.mode):
                raise NotADirectoryError(path)
        else:
            raise IsADirectoryError(path)  # the root itself
    raise CrfsError(f"{path}: too many levels of symbolic links")


def _verified_pieces(layer: Layer, path: str, size: int) -> Iterator[bytes]:
    if size <= CAT_ATOMIC_LIMIT:
        yield layer.read(path, 0, size)  # all or nothing: no byte before every chunk checks out
        return
    for offset in range(0, size, CAT_PIECE):
        yield layer.read(path, offset, min(CAT_PIECE, size - offset))


def run_cat(args: argparse.Namespace) -> int:
    with ExitStack() as resources:
        opened = _open_target(args, resources)
        resolve = opened.resolve if isinstance(opened, Image) else _single_layer_resolver(opened)
        try:
            layer, rel, st = _follow(resolve, args.path)
        except FileNotFoundError:
            raise CrfsError(f"{args.target}: {args.path}: no such file") from None
        except NotADirectoryError:
            raise CrfsError(f"{args.target}: {args.path}: a path component is not a directory") from None
        except IsADirectoryError:
            raise CrfsError(f"{args.target}: {args.path}: is a directory") from None
        if not stat_module.S_ISREG(st.mode):
            kind = "is a directory" if stat_module.S_ISDIR(st.mode) else "not a regular file"
            raise CrfsError(f"{args.target}: {args.path}: {kind}")
        out = sys.stdout.buffer
        try:
            for piece in _verified_pieces(layer, rel, st.size):
                out.write(piece)
        except VerificationError as exc:
            raise CrfsError(f"{args.path}: I/O error: {exc}") from None
        out.flush()
    return 0


def _single_layer_resolver(layer: Layer) -> Callable[[str], tuple[Layer, str]]:
    def resolve(path: str) -> tuple[Layer, str]:
        rel = posixpath.normpath("/" + path).lstrip("/")
        if not layer.exists(rel):
            raise FileNotFoundError(path)
        return layer, rel
    return resolve


# ---------------------------------------------------------------- worker

def run_lowerdir(args: argparse.Namespace) -> int:
    value = lowerdir_for(args.ref, allow_unverified=args.allow_unverified)
    worker.ensure_worker()  # so the first mount does not wait for a worker to start
    print(value)
    return 0


def run_stats(args: argparse.Namespace) -> int:
    rows = worker.request_stats()
    print(json.dumps(rows, indent=1) if args.json else worker.format_stats(rows))
    return 0


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        return worker.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except CrfsError as exc:
        print(f"crfs: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (crfs cat | head): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        # Local files the user named (a blob, a --prioritize list, an OCI layout).
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"crfs: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
