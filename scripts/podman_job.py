"""The podman job: rootless podman starts a container from an eStargz image lazily.

As root, once: a Debian image made with debootstrap (cached in /var/cache/crfs-tests),
the user `crfs-e2e` set up with podman-examples/setup-rootless.sh, a local
docker-registry with its access log on. podman imports and pushes the image (gzip),
`crfs convert` makes an eStargz copy; then for each way podman reads the crfs layer store
(`store`: fuse-overlayfs over the store alone; `plugin`: the mount_program wrapper that
reads store layers through crfs.so; `kernel`: the kernel's rootless overlay) a cold
worker serves `podman pull` and `podman run IMAGE python3 -c 'print(42)'`, and the
registry's access log says how many bytes that cost against the image's compressed size.
The rest of the flow (writes, a second run, rmi; for store and plugin also a push of the
lazily pulled image, a run of that copy and of the gzip original) runs too.

    .venv/bin/python scripts/podman_job.py
"""
from __future__ import annotations

import sys
import tempfile
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.support.podman import (  # noqa: E402 (after the path setup)
    FULL_FLOW,
    PATHS,
    REPORT_HEADER,
    CommandError,
    PathReport,
    PodmanUser,
    debootstrap_tarball,
    prepare_images,
    remove_tree,
    run_path,
)
from tests.support.registry import LoggedRegistry  # noqa: E402

USER = "crfs-e2e"


def run_main_job(user_name: str = USER, out=sys.stdout) -> list[PathReport]:  # type: ignore[no-untyped-def]
    """Runs the flow once per path and prints what each fetched; returns the reports."""
    print("base image: debootstrap --variant=minbase --include=python3 bookworm (cached)", file=out, flush=True)
    tarball = debootstrap_tarball()
    user = PodmanUser.ensure(user_name)
    print(f"user:       {user.name} (uid {user.uid}), set up by podman-examples/setup-rootless.sh", file=out)
    work = user.make_dir(user.home / "e2e" / uuid.uuid4().hex[:8])
    with tempfile.TemporaryDirectory(prefix="crfs-podman-job-") as tmp:
        registry = LoggedRegistry.start(Path(tmp) / "registry")
        try:
            images = prepare_images(user, registry, tarball, work)
            print(f"image:      {images.esgz_ref}: {len(images.esgz_layers)} eStargz layer(s), "
                  f"{images.esgz_bytes} bytes compressed (gzip original: {images.gzip_ref})", file=out)
            print("fetched from the registry (its access log), cold worker, `podman pull` then "
                  "`podman run --rm IMAGE python3 -c 'print(42)'`:", file=out)
            print(REPORT_HEADER, file=out, flush=True)
            reports = []
            for path in PATHS:
                report = run_path(user, images, work, path, full=path in FULL_FLOW)
                reports.append(report)
                print(report.line(), file=out, flush=True)
            for report in reports:
                print(f"{report.path}: outputs {report.outputs}; store layers via crfs.so in "
                      f"{report.plugin_mounts} container mount(s)", file=out)
            return reports
        finally:
            registry.stop()
            user.stop_worker()
            remove_tree(work)
            for runroot in user.runtime.glob(f"e2e-*{work.name}"):
                remove_tree(runroot)


def main() -> int:
    try:
        run_main_job()
    except (CommandError, RuntimeError) as exc:
        print(f"podman job failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
