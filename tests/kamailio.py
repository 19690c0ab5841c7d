"""Kamailio, the SIP proxy SIP Thor is tested with, as a real process on loopback."""

import os
import signal
import subprocess

from conftest import wait_for

from thor.node.health import Check

CONFIG = """#!KAMAILIO
debug=2
log_stderror=yes
children=1
disable_tcp=yes
listen=udp:127.0.0.1:{port}
mpath="/usr/lib/x86_64-linux-gnu/kamailio/modules/"
loadmodule "sl.so"
request_route {{
    sl_send_reply("200", "OK");
}}
"""


class Kamailio:
    def __init__(self, directory, port):
        self.directory = directory
        self.port = port
        self.process = None
        self.config = os.path.join(directory, "kamailio.cfg")
        with open(self.config, "w") as stream:
            stream.write(CONFIG.format(port=port))

    def start(self):
        log = open(os.path.join(self.directory, "kamailio.log"), "ab")  # noqa: SIM115 (as long as the process)
        self.process = subprocess.Popen(
            [
                "kamailio",
                "-DD",
                "-E",
                "-f",
                self.config,
                "-P",
                os.path.join(self.directory, "kamailio.pid"),
                "-Y",
                self.directory,
            ],
            stdout=log,
            stderr=log,
        )
        check = Check("sip", "127.0.0.1", self.port)
        wait_for(lambda: check.probe(0.2), timeout=10, message="Kamailio answering OPTIONS")

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(10)
