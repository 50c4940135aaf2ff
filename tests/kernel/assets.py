"""Build the boot assets of the QEMU guest that the kernel tests run in.

The guest boots Debian's generic amd64 kernel with an initramfs made of busybox-static,
the kernel modules the tests need, and the `/init` script below. Debian packages are
fetched with apt and unpacked with dpkg-deb into a cache directory, so a second run
needs no network. QEMU itself is installed with apt-get when it is missing.

Run `python -m tests.kernel.assets` to prepare everything ahead of the tests.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_ENV = "DEVPASS_KERNEL_CACHE"
DEFAULT_CACHE = REPO_ROOT / ".cache" / "kernel"

QEMU_BINARY = "qemu-system-x86_64"
QEMU_PACKAGE = "qemu-system-x86"
# The metapackage depends on the current versioned image package. The plain amd64
# flavour is used because the -cloud flavour leaves out e1000e.
KERNEL_METAPACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"

# Modules the guest loads, in this order; each one's own dependencies load before it.
# A name the kernel has built in is skipped, and one it does not ship is an error.
GUEST_MODULES = (
    # The 9p root, the tmpfs overlay over it, the command channel and the network.
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "overlay",
    "virtio_console",
    "virtio_net",
    # VFIO, the driver the tests bind to.
    "vfio",
    "vfio_iommu_type1",
    "vfio_virqfd",
    "irqbypass",
    "vfio-pci-core",
    "vfio-pci",
    # Drivers of the emulated devices the tests read and rebind.
    "e1000e",
    "drm",
    "drm_kms_helper",
    "ttm",
    "drm_ttm_helper",
    "drm_vram_helper",
    "bochs",
)

# The contract between the initramfs and the harness in guest.py.
ROOT_MOUNT_TAG = "devpass-root"
WORKDIR_MOUNT_TAG = "devpass-work"
COMMAND_PORT_NAME = "devpass.command"
WORKDIR_PARAMETER = "devpass.workdir"
START_SCRIPT_NAME = "guest-start.sh"
GUEST_ADDRESS = "10.0.2.15/24"
GUEST_GATEWAY = "10.0.2.2"

INIT_SCRIPT = r"""#!/bin/busybox sh
# PID 1 of the devpass test guest: load modules, build a chroot from the host's
# read-only root with a tmpfs overlay, and run the start script the harness wrote
# into its work directory. Powers the guest off when that script exits.
/bin/busybox --install -s /bin
export PATH=/bin

log() { read -r uptime _ < /proc/uptime; echo "devpass-init: [$uptime] $*"; }
# The kernel runs with `quiet`, so a failure also shows the end of the kernel log.
fail() { log "FAILED: $*"; dmesg | tail -n 40; sync; poweroff -f; sleep 60; }

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

while read -r module; do
    insmod "/modules/$module" || log "insmod $module failed"
done < /modules/load-order

WORKDIR=
for word in $(cat /proc/cmdline); do
    case "$word" in
        @WORKDIR_PARAMETER@=*) WORKDIR="${word#*=}" ;;
    esac
done
[ -n "$WORKDIR" ] || fail "no @WORKDIR_PARAMETER@= on the kernel command line"

# QEMU exports the host root with readonly=on, and the guest mounts it ro as well.
mkdir -p /mnt/lower /mnt/rw /newroot
mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=512000,cache=loose @ROOT_MOUNT_TAG@ /mnt/lower \
    || fail "mount of the host root over 9p"
mount -t tmpfs -o mode=0755 tmpfs /mnt/rw || fail "mount of the overlay tmpfs"
mkdir -p /mnt/rw/upper /mnt/rw/work
mount -t overlay overlay -o lowerdir=/mnt/lower,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work /newroot \
    || fail "mount of the overlay"

# The guest's own proc, sys and dev hide the host's, which the 9p export also shows.
mount -t proc proc /newroot/proc || fail "mount of /proc in the chroot"
mount -t sysfs sysfs /newroot/sys || fail "mount of /sys in the chroot"
mount -t devtmpfs devtmpfs /newroot/dev || fail "mount of /dev in the chroot"
mkdir -p /newroot/dev/pts /newroot/dev/shm /newroot/run
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs tmpfs /newroot/dev/shm
mount -t tmpfs tmpfs /newroot/run
mkdir -p "/newroot$WORKDIR"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=none @WORKDIR_MOUNT_TAG@ "/newroot$WORKDIR" \
    || fail "mount of the work directory $WORKDIR over 9p"

hostname devpass-guest
ip link set lo up
NETDEV=
for dev in /sys/class/net/*; do
    driver=$(readlink "$dev/device/driver")
    [ "${driver##*/}" = virtio_net ] && NETDEV="${dev##*/}"
done
[ -n "$NETDEV" ] || fail "no virtio-net interface"
ip addr add @GUEST_ADDRESS@ dev "$NETDEV"
ip link set "$NETDEV" up
ip route add default via @GUEST_GATEWAY@ dev "$NETDEV"

PORT=
for port in /sys/class/virtio-ports/*; do
    [ "$(cat "$port/name" 2>/dev/null)" = @COMMAND_PORT_NAME@ ] && PORT="/dev/${port##*/}"
done
[ -n "$PORT" ] || fail "no virtio-serial port named @COMMAND_PORT_NAME@"

log "chroot ready, starting $WORKDIR/@START_SCRIPT_NAME@ with command port $PORT"
DEVPASS_COMMAND_PORT="$PORT" chroot /newroot /bin/sh "$WORKDIR/@START_SCRIPT_NAME@"
log "start script exited with $?, powering off"
kill -TERM -1
sleep 1
kill -KILL -1
sync
umount "/newroot$WORKDIR"
poweroff -f
sleep 60
"""


class AssetError(RuntimeError):
    """A guest asset could not be installed, fetched or built."""


@dataclass(frozen=True)
class GuestAssets:
    """Paths of everything QEMU needs to boot the test guest."""

    qemu: Path
    kernel: Path
    """The uncompressed ELF kernel (vmlinux), which QEMU boots through its PVH entry point."""
    initramfs: Path
    kernel_release: str
    modules: tuple[str, ...]
    """Module files in the initramfs, in load order."""


@dataclass(frozen=True)
class KernelModule:
    """A kernel module file and the names of the modules it depends on."""

    name: str
    path: Path
    depends: tuple[str, ...]


def cache_dir() -> Path:
    """Return the asset cache: $DEVPASS_KERNEL_CACHE, else .cache/kernel under the repository."""
    configured = os.environ.get(CACHE_ENV)

    return Path(configured).resolve() if configured else DEFAULT_CACHE


def ensure_assets(cache: Path | None = None) -> GuestAssets:
    """Install QEMU if missing, fetch and unpack the packages, and build the initramfs.

    Each step reuses what an earlier run left in `cache`.

    Raises:
        AssetError: a tool is missing, apt or dpkg-deb failed, or a module is not found.
    """
    cache = cache if cache is not None else cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    qemu = ensure_qemu()
    with _locked(cache / ".lock"):
        packages = _ensure_packages(cache)
        kernel_tree = cache / packages["kernel_package"]
        release = packages["kernel_release"]
        busybox = cache / BUSYBOX_PACKAGE / "bin" / "busybox"
        modules = resolve_modules(kernel_tree / "lib" / "modules" / release, GUEST_MODULES)
        initramfs = _ensure_initramfs(cache, release, busybox, modules)
        kernel = _ensure_vmlinux(kernel_tree / "boot" / f"vmlinuz-{release}", cache / f"vmlinux-{release}")

    return GuestAssets(
        qemu=qemu,
        kernel=kernel,
        initramfs=initramfs,
        kernel_release=release,
        modules=tuple(module.path.name for module in modules),
    )


def ensure_qemu() -> Path:
    """Return the path of qemu-system-x86_64, installing qemu-system-x86 with apt-get if missing."""
    found = shutil.which(QEMU_BINARY)
    if found is not None:
        return Path(found)

    if os.geteuid() != 0:
        raise AssetError(
            f"{QEMU_BINARY} is not installed and installing it needs root: "
            f"run `apt-get install --no-install-recommends {QEMU_PACKAGE}` as root"
        )
    _apt_update()
    _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", QEMU_PACKAGE])
    found = shutil.which(QEMU_BINARY)
    if found is None:
        raise AssetError(f"{QEMU_BINARY} is still missing after installing {QEMU_PACKAGE}")

    return Path(found)


def _ensure_packages(cache: Path) -> dict[str, str]:
    """Fetch and unpack the kernel image and busybox-static once; return the recorded names.

    A cache keeps the kernel it first got after Debian publishes a newer one; delete the
    cache directory to move to the newer kernel.
    """
    record = cache / "packages.json"
    if record.exists():
        packages: dict[str, str] = json.loads(record.read_text())
        if all(
            (cache / name / ".unpacked").exists() for name in (packages["kernel_package"], BUSYBOX_PACKAGE)
        ):
            return packages

    kernel_package = _kernel_package()
    downloads = cache / "debs"
    downloads.mkdir(exist_ok=True)
    for name in (kernel_package, BUSYBOX_PACKAGE):
        deb = _download(name, downloads)
        _unpack(deb, cache / name)
        # The unpacked tree is all that later runs read.
        deb.unlink()

    release = kernel_package.removeprefix("linux-image-")
    if not (cache / kernel_package / "lib" / "modules" / release).is_dir():
        raise AssetError(f"{kernel_package} has no lib/modules/{release}; is it a kernel image package?")
    packages = {"kernel_package": kernel_package, "kernel_release": release}
    record.write_text(json.dumps(packages, indent=2) + "\n")

    return packages


def _kernel_package() -> str:
    """Return the versioned image package that the metapackage depends on (linux-image-6.1.0-57-amd64)."""
    for attempt in range(2):
        output = _run(["apt-cache", "depends", KERNEL_METAPACKAGE], check=False)
        for line in output.splitlines():
            field, _, value = line.strip().partition(": ")
            if field == "Depends" and value.startswith("linux-image-"):
                return value
        if attempt == 0:
            _apt_update()

    raise AssetError(f"apt-cache knows no linux-image-* dependency of {KERNEL_METAPACKAGE}")


def _download(package: str, directory: Path) -> Path:
    existing = sorted(directory.glob(f"{package}_*.deb"))
    if existing:
        return existing[-1]

    _run(["apt-get", "download", "-q", package], cwd=directory)
    downloaded = sorted(directory.glob(f"{package}_*.deb"))
    if not downloaded:
        raise AssetError(f"apt-get download {package} left no {package}_*.deb in {directory}")

    return downloaded[-1]


def _unpack(deb: Path, target: Path) -> None:
    """Unpack `deb` into `target` with dpkg-deb; a `.unpacked` stamp marks a complete run."""
    if (target / ".unpacked").exists():
        return

    shutil.rmtree(target, ignore_errors=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _run(["dpkg-deb", "-x", str(deb), str(partial)])
        (partial / ".unpacked").write_text(deb.name + "\n")
        partial.rename(target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _apt_update() -> None:
    if os.geteuid() != 0:
        raise AssetError("apt's package lists are missing or stale: run `apt-get update` as root")
    _run(["apt-get", "update", "-q"])


def _run(command: list[str], *, cwd: Path | None = None, check: bool = True) -> str:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    except FileNotFoundError as err:
        raise AssetError(f"{command[0]} is not installed; the kernel tests need a Debian host") from err
    if check and result.returncode != 0:
        raise AssetError(
            f"`{' '.join(command)}` failed with exit status {result.returncode}:\n{result.stderr.strip()}"
        )

    return result.stdout


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` so that concurrent runs do not build the same files."""
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def resolve_modules(modules_dir: Path, names: Iterable[str]) -> list[KernelModule]:
    """Resolve module names to files, with each module's dependencies placed before it.

    Dependencies come from the `depends=` entry of each file's .modinfo section, because
    the package ships no modules.dep (depmod writes it on install). Names in
    modules.builtin are skipped.

    Raises:
        AssetError: a name is neither a module file nor built in.
    """
    files = _module_files(modules_dir)
    builtin = _builtin_names(modules_dir)
    ordered: dict[str, KernelModule] = {}

    def visit(name: str, chain: tuple[str, ...]) -> None:
        key = _module_key(name)
        if key in ordered or key in builtin:
            return
        if key in chain:
            raise AssetError(f"module dependency cycle: {' -> '.join((*chain, key))}")
        if key not in files:
            raise AssetError(f"kernel module {name} is neither in {modules_dir} nor built in")
        path = files[key]
        depends = tuple(d for d in read_modinfo(path).get("depends", "").split(",") if d)
        for dependency in depends:
            visit(dependency, (*chain, key))
        ordered[key] = KernelModule(key, path, depends)

    for name in names:
        visit(name, ())

    return list(ordered.values())


def _module_key(name: str) -> str:
    """Return the kernel's name of a module: file names may use '-' where the kernel uses '_'."""
    return name.replace("-", "_")


def _module_files(modules_dir: Path) -> dict[str, Path]:
    files = {}
    for path in (modules_dir / "kernel").rglob("*.ko"):
        files[_module_key(path.stem)] = path

    return files


def _builtin_names(modules_dir: Path) -> set[str]:
    builtin = modules_dir / "modules.builtin"
    if not builtin.exists():
        return set()
    lines = builtin.read_text().split()

    return {_module_key(Path(line).name.removesuffix(".ko")) for line in lines}


def read_modinfo(path: Path) -> dict[str, str]:
    """Read the `key=value` entries of a kernel module's .modinfo ELF section.

    A key that repeats (alias, parm) keeps its last value. Only 64-bit little-endian
    ELF files are read, which is what x86-64 modules are.

    Raises:
        AssetError: `path` is not such a file or has no .modinfo section.
    """
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise AssetError(f"{path} is not a 64-bit little-endian ELF file (a compressed module?)")

    (section_offset,) = struct.unpack_from("<Q", data, 0x28)
    entry_size, count, names_index = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", data, section_offset + i * entry_size) for i in range(count)]
    names_offset = sections[names_index][4]
    for name_offset, _type, _flags, _address, offset, size in sections:
        end = data.index(b"\0", names_offset + name_offset)
        if data[names_offset + name_offset : end] == b".modinfo":
            entries = data[offset : offset + size].split(b"\0")
            pairs = (entry.decode(errors="replace").partition("=") for entry in entries if b"=" in entry)
            return {key: value for key, _, value in pairs}

    raise AssetError(f"{path} has no .modinfo section")


def _ensure_vmlinux(bzimage: Path, target: Path) -> Path:
    """Unpack the ELF kernel from a bzImage, once.

    QEMU boots such an ELF file through its PVH entry point (Debian sets CONFIG_PVH=y),
    which skips the xz decompression: about 5 s of the guest's boot under TCG, as measured
    on a 2-core x86-64 VM with QEMU 7.2.
    The payload's place comes from the x86 boot protocol header (version 2.08 or later).

    Raises:
        AssetError: the file is not a bzImage with an xz payload.
    """
    if target.exists():
        return target

    data = bzimage.read_bytes()
    (protocol,) = struct.unpack_from("<H", data, 0x206)
    if data[0x202:0x206] != b"HdrS" or protocol < 0x0208:
        raise AssetError(f"{bzimage} has no x86 boot protocol header of version 2.08 or later")
    setup_sectors = data[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sectors + 1) * 512 + payload_offset
    payload = data[start : start + payload_length]
    try:
        vmlinux = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    except lzma.LZMAError as err:
        raise AssetError(f"the payload of {bzimage} is not xz data: {err}") from err
    if vmlinux[:4] != b"\x7fELF":
        raise AssetError(f"the payload of {bzimage} is not an ELF file")

    partial = target.with_suffix(".partial")
    partial.write_bytes(vmlinux)
    partial.rename(target)

    return target


def _ensure_initramfs(cache: Path, release: str, busybox: Path, modules: list[KernelModule]) -> Path:
    """Build the initramfs unless one with the same contents is in the cache already."""
    init = _render_init()
    load_order = "".join(f"{module.path.name}\n" for module in modules)
    digest = hashlib.sha256()
    for part in (init.encode(), load_order.encode(), busybox.read_bytes()):
        digest.update(hashlib.sha256(part).digest())
    for module in modules:
        digest.update(hashlib.sha256(module.path.read_bytes()).digest())
    target = cache / f"initramfs-{release}-{digest.hexdigest()[:16]}.cpio.gz"
    if target.exists():
        return target

    archive = CpioArchive()
    for directory in ("bin", "dev", "proc", "sys", "mnt", "modules", "newroot"):
        archive.directory(directory)
    # The kernel opens /dev/console for PID 1 before /init can mount devtmpfs.
    archive.character_device("dev/console", major=5, minor=1)
    archive.file("bin/busybox", busybox.read_bytes(), mode=0o755)
    archive.file("init", init.encode(), mode=0o755)
    archive.file("modules/load-order", load_order.encode())
    for module in modules:
        archive.file(f"modules/{module.path.name}", module.path.read_bytes())

    partial = target.with_suffix(".partial")
    partial.write_bytes(gzip.compress(archive.finish(), compresslevel=6, mtime=0))
    partial.rename(target)

    return target


def _render_init() -> str:
    values = {
        "WORKDIR_PARAMETER": WORKDIR_PARAMETER,
        "ROOT_MOUNT_TAG": ROOT_MOUNT_TAG,
        "WORKDIR_MOUNT_TAG": WORKDIR_MOUNT_TAG,
        "COMMAND_PORT_NAME": COMMAND_PORT_NAME,
        "START_SCRIPT_NAME": START_SCRIPT_NAME,
        "GUEST_ADDRESS": GUEST_ADDRESS,
        "GUEST_GATEWAY": GUEST_GATEWAY,
    }
    script = INIT_SCRIPT
    for key, value in values.items():
        script = script.replace(f"@{key}@", value)

    return script


class CpioArchive:
    """Writer of the cpio "newc" format that the kernel unpacks as an initramfs.

    Entries are owned by root with mtime 0, so the archive depends only on its contents.
    """

    _MAGIC = b"070701"

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._inode = 1

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, 0o040000 | mode, b"", nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def character_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, 0o020000 | mode, b"", rdev=(major, minor))

    def finish(self) -> bytes:
        """Append the trailer entry and return the archive."""
        self._entry("TRAILER!!!", 0, b"", inode=0, nlink=1)

        return b"".join(self._chunks)

    def _entry(
        self,
        name: str,
        mode: int,
        data: bytes,
        *,
        nlink: int = 1,
        rdev: tuple[int, int] = (0, 0),
        inode: int | None = None,
    ) -> None:
        encoded_name = name.encode() + b"\0"
        if inode is None:
            inode = self._inode
            self._inode += 1
        fields = (inode, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded_name), 0)
        header = self._MAGIC + b"".join(b"%08x" % value for value in fields)
        self._chunks.append(_pad4(header + encoded_name))
        self._chunks.append(_pad4(data))


def _pad4(chunk: bytes) -> bytes:
    return chunk + b"\0" * (-len(chunk) % 4)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.kernel.assets", description=__doc__)
    parser.add_argument(
        "--cache", type=Path, help=f"cache directory (default: ${CACHE_ENV} or {DEFAULT_CACHE})"
    )
    args = parser.parse_args(argv)
    try:
        assets = ensure_assets(args.cache.resolve() if args.cache else None)
    except AssetError as err:
        raise SystemExit(f"tests.kernel.assets: {err}") from None

    print(f"qemu:      {assets.qemu}")
    print(f"kernel:    {assets.kernel}")
    print(f"initramfs: {assets.initramfs}")
    print(f"modules:   {' '.join(assets.modules)}")


if __name__ == "__main__":
    sys.exit(main())
