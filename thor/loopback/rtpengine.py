"""rtpengine (Debian's rtpengine-daemon), the media relay of media_relay nodes, as a real
process on loopback: userspace forwarding (no kernel module), its control port (ng) on
loopback, media on the node's address."""

import os
import subprocess

from thor.health import Check
from thor.loopback.process import ProcessGroup, die_with_parent, free_port, wait_for

__all__ = ["RTPEngine"]


class RTPEngine(ProcessGroup):
    def __init__(self, directory, address, ports=(30000, 30999)):
        self.directory = os.path.join(str(directory), f"rtpengine-{address}")
        os.makedirs(self.directory, exist_ok=True)
        self.address = address
        self.ng = (address, free_port(address))
        self.ports = ports
        self.log_path = os.path.join(self.directory, "rtpengine.log")
        self.process = None

    def start(self, timeout=10):
        log = open(self.log_path, "ab")  # noqa: SIM115 (as long as the process)
        self.process = subprocess.Popen(
            [
                "rtpengine",
                "--config-file=none",
                "--table=-1",  # userspace forwarding: no kernel module
                f"--interface={self.address}",
                "--listen-ng={}:{}".format(*self.ng),
                f"--port-min={self.ports[0]}",
                f"--port-max={self.ports[1]}",
                f"--pidfile={os.path.join(self.directory, 'rtpengine.pid')}",
                "--foreground",
                "--log-stderr",
                "--log-level=6",
                "--delete-delay=0",
                "--endpoint-learning=heuristic",  # as the role configures it
            ],
            stdout=log,
            stderr=log,
            start_new_session=True,
            preexec_fn=die_with_parent,  # noqa: PLW1509 (one prctl call, safe between fork and exec)
        )
        check = Check("ng", *self.ng)

        def answering():
            if self.process.poll() is not None:
                raise AssertionError(f"rtpengine exited ({self.process.returncode}):\n{self.log()[-3000:]}")
            return check.probe(0.2)

        wait_for(answering, timeout=timeout, message=f"rtpengine on {self.address} answering ng pings")
