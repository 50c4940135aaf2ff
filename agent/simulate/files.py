"""Contents of the simulated sysfs and /proc files, and the helpers that write them."""

from __future__ import annotations

import ipaddress
import os
import re
import struct
from pathlib import Path

from agent.simulate.devices import DeviceDescription, NetDescription

# Size of a PCIe function's config space as root reads it from sysfs.
_CONFIG_SPACE_SIZE = 4096
_DSN_CAPABILITY_OFFSET = 0x100


def _attributes(spec: DeviceDescription) -> dict[str, tuple[str | bytes, int]]:
    """Return each attribute file of a PCI function with its content and sysfs mode."""
    attributes: dict[str, tuple[str | bytes, int]] = {
        "vendor": (f"0x{spec.vendor}\n", 0o444),
        "device": (f"0x{spec.device}\n", 0o444),
        "subsystem_vendor": (f"0x{spec.subsystem_vendor}\n", 0o444),
        "subsystem_device": (f"0x{spec.subsystem_device}\n", 0o444),
        "class": (f"0x{spec.class_code}\n", 0o444),
        "revision": (f"0x{spec.revision}\n", 0o444),
        "numa_node": (f"{spec.numa_node}\n", 0o644),
        "driver_override": ("(null)\n", 0o644),
        "modalias": (_modalias(spec) + "\n", 0o444),
        "uevent": (_uevent(spec, None), 0o644),
        "config": (_config_space(spec), 0o644),
        "resource0": ("", 0o600),
        "enable": ("1\n", 0o644),
        "remove": ("", 0o200),
        "rescan": ("", 0o200),
    }
    if spec.boot_vga is not None:
        attributes["boot_vga"] = ("1\n" if spec.boot_vga else "0\n", 0o444)
    if spec.sriov is not None:
        attributes["sriov_totalvfs"] = (f"{spec.sriov.totalvfs}\n", 0o444)
        attributes["sriov_numvfs"] = ("0\n", 0o664)

    return attributes


def _modalias(spec: DeviceDescription) -> str:
    return (
        f"pci:v0000{spec.vendor.upper()}d0000{spec.device.upper()}"
        f"sv0000{spec.subsystem_vendor.upper()}sd0000{spec.subsystem_device.upper()}"
        f"bc{spec.class_code[0:2].upper()}sc{spec.class_code[2:4].upper()}i{spec.class_code[4:6].upper()}"
    )


def _uevent(spec: DeviceDescription, driver: str | None) -> str:
    lines = [f"DRIVER={driver}"] if driver is not None else []
    lines += [
        f"PCI_CLASS={int(spec.class_code, 16):X}",
        f"PCI_ID={spec.vendor.upper()}:{spec.device.upper()}",
        f"PCI_SUBSYS_ID={spec.subsystem_vendor.upper()}:{spec.subsystem_device.upper()}",
        f"PCI_SLOT_NAME={spec.address}",
        f"MODALIAS={_modalias(spec)}",
    ]

    return "".join(line + "\n" for line in lines)


def _config_space(spec: DeviceDescription) -> bytes:
    """Build the function's config space: the standard header and, with a serial, a DSN.

    Linux has no sysfs attribute for the serial number, so readers parse the Device
    Serial Number extended capability (id 0x0003) from the ``config`` file.
    """
    config = bytearray(_CONFIG_SPACE_SIZE)
    class_code = int(spec.class_code, 16)
    struct.pack_into("<HH", config, 0x00, int(spec.vendor, 16), int(spec.device, 16))
    struct.pack_into("<I", config, 0x08, class_code << 8 | int(spec.revision, 16))
    config[0x0E] = spec.header_type
    if spec.header_type == 0:
        struct.pack_into("<HH", config, 0x2C, int(spec.subsystem_vendor, 16), int(spec.subsystem_device, 16))

    if spec.serial is not None:
        serial = int(spec.serial, 16)
        header = 0x0003 | 1 << 16  # capability id 3, version 1, no next capability
        struct.pack_into("<III", config, _DSN_CAPABILITY_OFFSET, header, serial & 0xFFFFFFFF, serial >> 32)

    return bytes(config)


def _route_table(nets: list[NetDescription]) -> str:
    """Format IPv4 routes the way /proc/net/route prints them.

    Addresses are in network byte order printed as a host-order (little-endian) word,
    and every line is padded to 127 characters, as the kernel does on x86.
    """
    header = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT"
    lines = [header]
    for net in nets:
        networks = [
            interface
            for interface in map(ipaddress.ip_interface, net.addresses)
            if isinstance(interface, ipaddress.IPv4Interface)
        ]
        # An interface whose addresses are all IPv6 gets an IPv6 default route only.
        if net.default_route and (networks or not net.addresses):
            gateway = _default_gateway(networks)
            lines.append(_route_line(net.interface, 0, gateway, 0x0003, 0))
        for interface in networks:
            network = interface.network
            lines.append(
                _route_line(net.interface, int(network.network_address), 0, 0x0001, int(network.netmask))
            )

    return "".join(f"{line:<127}\n" for line in lines)


def _ipv6_route_table(nets: list[NetDescription]) -> str:
    """Format IPv6 routes the way /proc/net/ipv6_route prints them.

    Each line has the destination and its prefix length, the source (always ::/0
    here), the next hop, metric, reference count, use count, flags and interface, all
    in hex but the interface name.
    """
    lines = []
    for net in nets:
        networks = [
            interface
            for interface in map(ipaddress.ip_interface, net.addresses)
            if isinstance(interface, ipaddress.IPv6Interface)
        ]
        if net.default_route and networks:
            gateway = _default_gateway(networks)
            lines.append(_ipv6_route_line(net.interface, 0, 0, gateway, 1024, 0x0003))
        for interface in networks:
            network = interface.network
            address = int(network.network_address)
            lines.append(_ipv6_route_line(net.interface, address, network.prefixlen, 0, 256, 0x0001))

    return "".join(line + "\n" for line in lines)


def _ipv6_route_line(
    interface: str, destination: int, prefix: int, gateway: int, metric: int, flags: int
) -> str:
    zero = f"{0:032x}"
    return (
        f"{destination:032x} {prefix:02x} {zero} 00 {gateway:032x} "
        f"{metric:08x} {1:08x} {0:08x} {flags:08x} {interface:>8}"
    )


def _default_gateway(networks: list[ipaddress.IPv4Interface] | list[ipaddress.IPv6Interface]) -> int:
    """Return the default gateway: the first address of the first network, skipping the host's own."""
    if not networks:
        return 0

    first = networks[0]
    candidate = first.network.network_address + 1
    if candidate == first.ip:
        candidate += 1

    return int(candidate)


def _route_line(interface: str, destination: int, gateway: int, flags: int, mask: int) -> str:
    return (
        f"{interface}\t{_route_hex(destination)}\t{_route_hex(gateway)}\t{flags:04X}\t0\t0\t100\t"
        f"{_route_hex(mask)}\t0\t0\t0"
    )


def _route_hex(address: int) -> str:
    return f"{int.from_bytes(address.to_bytes(4, 'big'), 'little'):08X}"


def _nvidia_minor(spec: DeviceDescription) -> int | None:
    for node in spec.char_devices:
        match = re.fullmatch(r"/dev/nvidia(\d+)", node)
        if match is not None:
            return int(match[1])

    return None


def _write_file(path: Path, content: str | bytes, mode: int) -> None:
    """Replace ``path`` with ``content`` and ``mode`` in one rename.

    A process killed mid-write leaves the old or the new file, never a truncated one,
    so ``SimulatedHost.reopen`` reads what the last completed write stored.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    data = content.encode() if isinstance(content, str) else content
    partial = path.with_name(f".{path.name}.partial")
    partial.unlink(missing_ok=True)
    partial.write_bytes(data)
    partial.chmod(mode)
    os.replace(partial, path)


def _symlink(link: Path, target: Path) -> None:
    """Create ``link`` as a relative link to ``target``, as sysfs links are."""
    os.symlink(os.path.relpath(target, link.parent), link)


def _consoles(names: tuple[str, ...]) -> str:
    """Format /proc/consoles as fs/proc/consoles.c prints it.

    Each line has the name padded to 20 columns, the read, write and unblank
    operations, the flags and the tty's major:minor. The flags are those of kernels
    with nbcon consoles: Enabled, Console device, Boot, Nbcon, printbuffer, braille and
    anytime. The first console is the console device.
    """
    lines = []
    for position, name in enumerate(names):
        match = re.fullmatch(r"([A-Za-z]+?)([0-9]+)", name)
        driver, index = (match[1], int(match[2])) if match is not None else (name, 0)
        consdev = "C" if position == 0 else " "
        if driver == "tty":
            # A virtual terminal console writes to the foreground VT, tty1 after boot.
            line = f"{name:<20} -WU (E{consdev}  p  )    4:{max(index, 1)}"
        elif driver == "ttyS":
            line = f"{name:<20} -W- (E{consdev}  p a)    4:{64 + index}"
        else:
            line = f"{name:<20} -W- (E{consdev}  p  )"
        lines.append(line)

    return "".join(line + "\n" for line in lines)


def _swaps(paths: tuple[str, ...]) -> str:
    """Format /proc/swaps: a header, then one partition line per swap device (1 GiB, unused)."""
    lines = ["Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority"]
    lines += [f"{path:<40}partition\t1048572\t\t0\t\t-2" for path in paths]

    return "".join(line + "\n" for line in lines)
