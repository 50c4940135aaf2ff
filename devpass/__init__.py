"""devpass: a fleet-wide registry of PCI devices for VFIO passthrough."""

__version__ = "0.1.0"
