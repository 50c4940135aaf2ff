"""An agent serving a simulated host inside the test process, so tests can reach its kernel."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from agent.main import AgentConfig, run_agent, simulated_environment
from agent.simulate import HostDescription, SimulatedHost
from tests.conftest import HOSTS_DIR


class InProcessAgent:
    """Run `run_agent` on its own event loop thread; `host.kernel` is the live simulated kernel.

    Tests inject faults and make hardware changes (SR-IOV, removal) through `host.kernel`
    while the controller talks to this agent over loopback.
    """

    def __init__(
        self,
        controller: str,
        workdir: Path,
        description: str,
        *,
        host: SimulatedHost | None = None,
        host_name: str | None = None,
        write_timeout: float = 1.0,
    ) -> None:
        self.workdir = workdir
        self.host = host or SimulatedHost.build(
            HostDescription.from_yaml(HOSTS_DIR / description), workdir / "host"
        )
        self.host.kernel.hang_timeout = 60.0
        self._environment = simulated_environment(self.host, workdir / "state", host_name=host_name)
        self._config = AgentConfig(controller=controller, write_timeout=write_timeout)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self.address = ""
        self._thread = threading.Thread(target=self._run, name=f"agent-{self.name}", daemon=True)
        self._error: BaseException | None = None

    @property
    def name(self) -> str:
        return self._environment.host_name

    def start(self) -> InProcessAgent:
        self._thread.start()
        if not self._ready.wait(30):
            raise AssertionError(f"in-process agent {self.name} did not start: {self._error!r}")
        if self._error is not None:
            raise AssertionError(f"in-process agent {self.name} failed: {self._error!r}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self.host.kernel.release_hangs()
        self._thread.join(15)

    def device(self, address: str) -> Path:
        return self.host.device_path(address)

    def driver(self, address: str) -> str | None:
        link = self.host.device_path(address) / "driver"
        return link.readlink().name if link.is_symlink() else None

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()

            def ready(address: str) -> None:
                self.address = address
                self._ready.set()

            await run_agent(self._environment, self._config, self._stop, ready=ready)

        try:
            asyncio.run(main())
        except BaseException as err:
            self._error = err
            self._ready.set()
