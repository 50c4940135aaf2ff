"""The `devpass` command: start a local fleet, and register and inspect devices."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from devpass import client, errors
from devpass.v1 import devices_pb2, devices_pb2_grpc, hosts_pb2, hosts_pb2_grpc

# Exit status of a call the controller rejected or could not serve.
EXIT_REJECTED = 1
# Exit status of a command line that argparse rejected.
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="devpass", description=__doc__)
    parser.add_argument(
        "--controller",
        help=(
            f"controller address host:port (default: ${client.CONTROLLER_ENV} or {client.DEFAULT_CONTROLLER})"
        ),
    )
    parser.add_argument("-o", "--output", choices=("table", "json"), default="table", help="output format")
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="start a controller and agents on this machine")
    up.add_argument(
        "--simulate",
        type=Path,
        nargs="+",
        metavar="FILE",
        help="start one agent per simulated host description instead of one for this machine",
    )
    up.add_argument(
        "--state-dir",
        type=Path,
        help="directory for the registry, logs and simulated trees (default: ~/.local/state/devpass)",
    )
    up.add_argument("--listen", default=client.DEFAULT_CONTROLLER, help="controller listen address")
    up.add_argument(
        "--sysfs-root", type=Path, default=Path("/sys"), help="sysfs root of this machine's agent"
    )
    up.set_defaults(handler=_up)

    devices = commands.add_parser("devices", help="register and inspect devices").add_subparsers(
        dest="action", required=True
    )
    register = devices.add_parser("register", help="register a PCI device under a fleet-wide name")
    register.add_argument("pci_address", help="address such as 0000:a2:00.0 or a2:00.0")
    register.add_argument(
        "--host", default="", help="host of the device; optional when one host is connected"
    )
    register.add_argument("--name", default="", help="device name; generated from the address when left out")
    register.add_argument("--bind-vfio", action="store_true", help="also bind the device to vfio-pci")
    _add_bind_options(register)
    register.set_defaults(handler=_register)

    bind = devices.add_parser("bind", help="bind a registered device to vfio-pci")
    bind.add_argument("id_or_name")
    _add_bind_options(bind)
    bind.set_defaults(handler=_bind)

    unbind = devices.add_parser(
        "unbind", help="give a device back to the driver it had before devpass bound it"
    )
    unbind.add_argument("id_or_name")
    _add_request_id(unbind)
    unbind.set_defaults(handler=_unbind)

    attach = devices.add_parser("attach", help="bind a device if needed and mark it attached to an instance")
    attach.add_argument("id_or_name")
    attach.add_argument("instance_id", help="the virtual machine instance taking the device")
    _add_bind_options(attach)
    attach.set_defaults(handler=_attach)

    detach = devices.add_parser("detach", help="clear a device's attachment; it stays on vfio-pci")
    detach.add_argument("id_or_name")
    _add_request_id(detach)
    detach.set_defaults(handler=_detach)

    listing = devices.add_parser("list", help="list registered devices")
    listing.add_argument("--host", default="", help="only devices of this host")
    listing.add_argument("--type", default="", choices=("", "gpu", "pci"), help="only devices of this type")
    listing.add_argument(
        "--page-size", type=int, default=0, help="devices per page; with it, only one page is shown"
    )
    listing.add_argument("--page-token", default="", help="token of the page to show, from a previous page")
    listing.set_defaults(handler=_list)

    get = devices.add_parser("get", help="show one device")
    get.add_argument("id_or_name")
    get.set_defaults(handler=_get)

    delete = devices.add_parser(
        "delete", help="unregister a device, giving it back to its driver if devpass bound it"
    )
    delete.add_argument("id_or_name")
    delete.add_argument(
        "--force",
        action="store_true",
        help="unregister even while attached, or when giving the device back to its driver fails",
    )
    _add_request_id(delete)
    delete.set_defaults(handler=_delete)

    available = devices.add_parser(
        "available", help="list the PCI functions hosts offer, and what blocks them"
    )
    available.add_argument("--host", default="", help="only this host (default: every available host)")
    available.set_defaults(handler=_available)

    watch = devices.add_parser("watch", help="print changes in the fleet as they happen, until Ctrl-C")
    watch.add_argument("--host", default="", help="only events of this host")
    watch.add_argument("--device", default="", help="only events of this device id or name")
    watch.add_argument(
        "--after", type=int, default=0, help="resume after this event cursor (default: from now on)"
    )
    watch.set_defaults(handler=_watch)

    hosts = commands.add_parser("hosts", help="inspect hosts").add_subparsers(dest="action", required=True)
    hosts.add_parser("list", help="list hosts and their state").set_defaults(handler=_hosts)

    return parser


def _add_bind_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--include-group",
        action="store_true",
        help="bind every function of the device's IOMMU group together",
    )
    parser.add_argument(
        "--force", action="store_true", help="bind even a device the host depends on (logged by the agent)"
    )
    _add_request_id(parser)


def _add_request_id(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--request-id",
        default="",
        help="id that makes a retry of this call return the first result (default: a new random id)",
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except errors.DevpassError as err:
        _report_error(args, err.code, err.reason, err.message, err.metadata)
        raise SystemExit(EXIT_REJECTED) from None
    except grpc.RpcError as err:
        domain_error = errors.from_rpc_error(err)
        if domain_error is not None:
            _report_error(
                args, domain_error.code, domain_error.reason, domain_error.message, domain_error.metadata
            )
        else:
            code = err.code()
            hint = ""
            if code == grpc.StatusCode.UNAVAILABLE:
                hint = f" (is the controller running at {client.controller_address(args.controller)}?)"
            _report_error(args, code, code.name, f"{err.details()}{hint}", {})
        raise SystemExit(EXIT_REJECTED) from None


def _report_error(
    args: argparse.Namespace, code: grpc.StatusCode, reason: str, message: str, metadata: dict[str, str]
) -> None:
    if args.output == "json":
        body = {"error": {"code": code.name, "reason": reason, "message": message, "metadata": metadata}}
        print(json.dumps(body, indent=2), file=sys.stderr)
    else:
        print(f"error: {reason}: {message}", file=sys.stderr)


def _devices_stub(args: argparse.Namespace) -> devices_pb2_grpc.DeviceServiceStub:
    return devices_pb2_grpc.DeviceServiceStub(_connect(args))


def _connect(args: argparse.Namespace) -> grpc.Channel:
    return client.connect(client.controller_address(args.controller))


def _register(args: argparse.Namespace) -> None:
    device = _devices_stub(args).RegisterDevice(
        devices_pb2.RegisterDeviceRequest(
            host=args.host,
            pci_address=args.pci_address,
            name=args.name,
            bind_vfio=args.bind_vfio,
            include_group=args.include_group,
            force=args.force,
            request_id=client.request_id(args.request_id),
        )
    )
    _print_devices(args, [device], single=True)


def _bind(args: argparse.Namespace) -> None:
    response = _devices_stub(args).BindDevice(
        devices_pb2.BindDeviceRequest(
            id_or_name=args.id_or_name,
            include_group=args.include_group,
            force=args.force,
            request_id=client.request_id(args.request_id),
        )
    )
    if args.output == "json":
        _print_json(_to_dict(response))
        return
    _print_devices(args, [response.device])
    if response.group_bound:
        print(f"also bound from the same IOMMU group: {', '.join(response.group_bound)}")


def _unbind(args: argparse.Namespace) -> None:
    response = _devices_stub(args).UnbindDevice(
        devices_pb2.UnbindDeviceRequest(
            id_or_name=args.id_or_name, request_id=client.request_id(args.request_id)
        )
    )
    if args.output == "json":
        _print_json(_to_dict(response))
        return
    print(f"{response.device.name} is back on {response.restored_driver or 'no driver'}")
    for sibling in response.group_restored:
        print(f"also given back from the same IOMMU group: {sibling}")


def _attach(args: argparse.Namespace) -> None:
    device = _devices_stub(args).AttachDevice(
        devices_pb2.AttachDeviceRequest(
            id_or_name=args.id_or_name,
            instance_id=args.instance_id,
            include_group=args.include_group,
            force=args.force,
            request_id=client.request_id(args.request_id),
        )
    )
    _print_devices(args, [device], single=True)


def _detach(args: argparse.Namespace) -> None:
    device = _devices_stub(args).DetachDevice(
        devices_pb2.DetachDeviceRequest(
            id_or_name=args.id_or_name, request_id=client.request_id(args.request_id)
        )
    )
    _print_devices(args, [device], single=True)


def _list(args: argparse.Namespace) -> None:
    stub = _devices_stub(args)
    request = devices_pb2.ListDevicesRequest(
        host=args.host, type=args.type, page_size=args.page_size, page_token=args.page_token
    )
    one_page = bool(args.page_size or args.page_token)
    devices: list[devices_pb2.Device] = []
    while True:
        response = stub.ListDevices(request)
        devices.extend(response.devices)
        if one_page or not response.next_page_token:
            break
        request.page_token = response.next_page_token

    if args.output == "json":
        body: dict[str, Any] = {"devices": [_to_dict(d) for d in devices]}
        if one_page:
            body["next_page_token"] = response.next_page_token
        _print_json(body)
        return
    _print_devices(args, devices)
    if one_page and response.next_page_token:
        print(f"next page: --page-token {response.next_page_token}")


def _get(args: argparse.Namespace) -> None:
    device = _devices_stub(args).GetDevice(devices_pb2.GetDeviceRequest(id_or_name=args.id_or_name))
    _print_devices(args, [device], single=True)


def _delete(args: argparse.Namespace) -> None:
    response = _devices_stub(args).UnregisterDevice(
        devices_pb2.UnregisterDeviceRequest(
            id_or_name=args.id_or_name, force=args.force, request_id=client.request_id(args.request_id)
        )
    )
    if args.output == "json":
        _print_json(_to_dict(response))
        return
    device = response.device
    restored = f"; back on {response.restored_driver}" if response.restored_driver else ""
    print(f"unregistered {device.name} ({device.pci_address} on {device.host}){restored}")
    for sibling in response.group_restored:
        print(f"also given back from the same IOMMU group: {sibling}")


def _available(args: argparse.Namespace) -> None:
    response = _devices_stub(args).ListAvailableDevices(
        devices_pb2.ListAvailableDevicesRequest(host=args.host)
    )
    if args.output == "json":
        _print_json(_to_dict(response))
        return

    rows = []
    for entry in response.devices:
        function = entry.function
        rows.append(
            [
                entry.host,
                function.pci_address,
                f"{function.vendor_id}:{function.device_id}",
                function.type,
                _group(function),
                function.driver or "-",
                entry.registered_name or "-",
                "yes"
                if entry.assignability.assignable
                else "no: " + ", ".join(b.reason for b in entry.assignability.blockers),
                _describe(function.vendor_name, function.device_name),
            ]
        )
    _print_table(
        ["HOST", "PCI ADDRESS", "ID", "TYPE", "GROUP", "DRIVER", "REGISTERED", "ASSIGNABLE", "DESCRIPTION"],
        rows,
    )
    for failure in response.unreachable_hosts:
        print(
            f"warning: host {failure.host} not listed: {failure.reason}: {failure.message}", file=sys.stderr
        )


def _watch(args: argparse.Namespace) -> None:
    request = devices_pb2.WatchDevicesRequest(host=args.host, device=args.device, after_cursor=args.after)
    try:
        for event in _devices_stub(args).WatchDevices(request):
            if args.output == "json":
                print(json.dumps(_to_dict(event)), flush=True)
                continue
            what = " ".join(part for part in (event.name, event.pci_address) if part) or "-"
            detail = f"  ({event.detail})" if event.detail else ""
            print(f"{event.cursor:>8}  {event.kind:<16} {event.host or '-':<16} {what}{detail}", flush=True)
    except KeyboardInterrupt:
        pass


def _hosts(args: argparse.Namespace) -> None:
    stub = hosts_pb2_grpc.HostServiceStub(_connect(args))
    response = stub.ListHosts(hosts_pb2.ListHostsRequest())
    if args.output == "json":
        _print_json(_to_dict(response))
        return

    rows = [
        [
            host.name + (" (simulated)" if host.simulated else ""),
            "available" if host.available else "unavailable",
            f"{host.heartbeat_age_seconds:.1f}s",
            host.agent_version,
            "on" if host.iommu_enabled else "off",
            "yes" if host.vfio_available else "no",
            str(host.pci_function_count),
            host.agent_address,
        ]
        for host in response.hosts
    ]
    _print_table(
        ["HOST", "STATE", "HEARTBEAT AGE", "AGENT", "IOMMU", "VFIO", "FUNCTIONS", "AGENT ADDRESS"], rows
    )


def _up(args: argparse.Namespace) -> None:
    from devpass.up import run_local_fleet

    run_local_fleet(args)


def _print_devices(args: argparse.Namespace, devices: list[devices_pb2.Device], single: bool = False) -> None:
    if args.output == "json":
        _print_json(_to_dict(devices[0]) if single else {"devices": [_to_dict(d) for d in devices]})
        return

    rows = [
        [
            device.name,
            device.host,
            device.pci_address,
            device.type,
            f"{device.vendor_id}:{device.device_id}",
            _group(device),
            device.driver or "-",
            "yes" if device.bound_to_vfio else "no",
            device.attached_to or "-",
            _state(device),
            device.id,
        ]
        for device in devices
    ]
    _print_table(
        [
            "NAME",
            "HOST",
            "PCI ADDRESS",
            "TYPE",
            "ID",
            "GROUP",
            "DRIVER",
            "VFIO",
            "ATTACHED",
            "STATE",
            "DEVICE ID",
        ],
        rows,
    )


def _state(device: devices_pb2.Device) -> str:
    if device.stale:
        return "stale"
    if not device.host_available:
        return "host unavailable"
    if not device.present:
        return "absent"

    return "simulated" if device.simulated else "ok"


def _group(message: Any) -> str:
    return str(message.iommu_group) if message.HasField("iommu_group") else "-"


def _describe(vendor: str, device: str) -> str:
    return " ".join(part for part in (vendor, device) if part) or "-"


def _to_dict(message: Message) -> dict[str, Any]:
    converted: dict[str, Any] = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )

    return converted


def _print_json(body: Any) -> None:
    print(json.dumps(body, indent=2))


def _print_table(headers: list[str], rows: list[list[str]], write: Callable[[str], None] = print) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=False)]
    for row in [headers, *rows]:
        write("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=False)).rstrip())


if __name__ == "__main__":
    main()
