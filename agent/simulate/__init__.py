"""A simulated host: a sysfs, /dev and /proc tree in a directory, and a kernel for its writes.

Tests and demos run the agent's real read and write code against this tree instead of
the machine's own /sys. ``HostDescription`` is parsed from a YAML host description,
``SimulatedHost.build`` lays out the tree the way Linux does, and ``SimulatedKernel``
applies the kernel's rules (and its errno values) to every write the agent makes.

The layout and the errno values follow Linux 6.x (drivers/base/dd.c and bus.c,
drivers/pci/pci-sysfs.c and iov.c, drivers/vfio/pci/vfio_pci_core.c):

- ``sys/devices/pci<domain>:<bus>/[<bridge>/...]<address>/`` contains each function's
  attributes, with relative ``driver``, ``iommu_group``, ``subsystem``, ``physfn`` and
  ``virtfnN`` links.
- ``sys/bus/pci/{devices,drivers,drivers_probe,rescan}``, ``sys/kernel/iommu_groups``,
  ``sys/class/{net,block,graphics,drm}`` and ``sys/module/vfio_pci`` are where the
  kernel puts them. Bridges, bonds, VLANs, dm and md disks are under ``sys/devices/virtual``.
- ``dev/vfio/<group>`` exists while a function of the group is bound to vfio-pci.
- ``proc/<pid>/fd`` links point at absolute paths under the simulated dev root, or
  under the simulated sysfs root with links resolved.
- ``proc/{mounts,swaps,cmdline,consoles,net/route,net/ipv6_route}`` describe the
  host's use of its functions.

Modules: ``devices`` and ``description`` contain the parsed description, ``fields``
reads its YAML values and ``validation`` checks the rules that span devices. ``tree``
builds the host, and ``reopen`` reads back the kernel state that an earlier process
left in its tree. ``kernel`` applies writes, and the ``bus`` it extends keeps the sysfs
tree in step with the present functions. ``files`` formats sysfs and /proc contents.
``virtual`` parses the host-level parts that belong to no function, ``stacks`` lays out
the virtual interfaces and disks, and ``display`` the framebuffer and DRM entries.
"""

from agent.simulate.description import HostDescription
from agent.simulate.devices import (
    VFIO_DRIVER,
    BlockDescription,
    DeviceDescription,
    NetDescription,
    ProcessDescription,
    SriovDescription,
    VirtualBlockDescription,
    VirtualInterfaceDescription,
)
from agent.simulate.kernel import FaultAttribute, FaultError, SimulatedKernel
from agent.simulate.tree import SimulatedHost

__all__ = [
    "VFIO_DRIVER",
    "BlockDescription",
    "DeviceDescription",
    "FaultAttribute",
    "FaultError",
    "HostDescription",
    "NetDescription",
    "ProcessDescription",
    "SimulatedHost",
    "SimulatedKernel",
    "SriovDescription",
    "VirtualBlockDescription",
    "VirtualInterfaceDescription",
]
