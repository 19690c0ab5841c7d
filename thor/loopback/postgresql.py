"""Real PostgreSQL 15 and PowerDNS 4.7 (gpgsql) as processes on loopback (Debian's packages)."""

import os
import shutil
import subprocess
import tempfile

from thor.loopback.pki import ScratchPKI
from thor.loopback.process import exited, free_port, wait_for

__all__ = ["SCHEMA", "PostgreSQL", "PowerDNS"]

PG_BIN = "/usr/lib/postgresql/15/bin"
SCHEMA = "/usr/share/pdns-backend-pgsql/schema/schema.pgsql.sql"


def _as_postgres(command):
    """PostgreSQL refuses to run as root: run its tools as the postgres user when we are root."""
    if os.geteuid() == 0:
        command = ["runuser", "-u", "postgres", "--", *command]
    return command


class PostgreSQL:
    """A cluster serving TLS as the rollout's does: a certificate for 127.0.0.1 issued by a CA of
    its own (ca: what clients check it against with sslmode=verify-full)."""

    def __init__(self):
        # Its own folder under /tmp: pytest's folders are closed to the postgres user.
        directory = tempfile.mkdtemp(prefix="thor-test-pg-")
        self.root = directory
        self.directory = os.path.join(directory, "pgdata")
        self.socket_dir = os.path.join(directory, "pgsocket")
        self.port = free_port()
        self.log = os.path.join(directory, "postgresql.log")
        os.makedirs(self.socket_dir, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(directory, "postgres")
            shutil.chown(self.socket_dir, "postgres")
        subprocess.run(
            _as_postgres([f"{PG_BIN}/initdb", "-D", self.directory, "-U", "postgres", "--auth=trust", "-E", "UTF8"]),
            check=True,
            capture_output=True,
            timeout=120,
        )
        self._certify()
        self.start()

    def _certify(self):
        pki = ScratchPKI(os.path.join(self.root, "ca"))
        files = pki.issue("database", "thor_database", address="127.0.0.1")
        self.ca = files["ca"]
        self.certificate = os.path.join(self.directory, "server.crt")
        self.private_key = os.path.join(self.directory, "server.key")
        shutil.copyfile(files["certificate"], self.certificate)
        shutil.copyfile(files["private_key"], self.private_key)
        os.chmod(self.private_key, 0o600)  # PostgreSQL refuses a key others may read
        if os.geteuid() == 0:
            shutil.chown(self.certificate, "postgres")
            shutil.chown(self.private_key, "postgres")

    def start(self):
        options = (
            f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1 -c fsync=off "
            f"-c ssl=on -c ssl_cert_file={self.certificate} -c ssl_key_file={self.private_key}"
        )
        subprocess.run(
            _as_postgres([f"{PG_BIN}/pg_ctl", "-D", self.directory, "-l", self.log, "-o", options, "-w", "start"]),
            check=True,
            capture_output=True,
            timeout=60,
        )

    def freeze(self, frozen=True):
        """SIGSTOP (or SIGCONT) the server and its backends: a host frozen without a word (its
        kernel still completes handshakes and acknowledges data)."""
        with open(os.path.join(self.directory, "postmaster.pid")) as stream:
            postmaster = stream.readline().strip()
        children = subprocess.run(["pgrep", "-P", postmaster], capture_output=True, text=True, check=False)
        signal = "-STOP" if frozen else "-CONT"
        subprocess.run(["kill", signal, postmaster, *children.stdout.split()], check=True, timeout=10)

    def stop(self):
        subprocess.run(
            _as_postgres([f"{PG_BIN}/pg_ctl", "-D", self.directory, "-m", "fast", "-w", "stop"]),
            check=False,  # stopping what already stopped is fine
            capture_output=True,
            timeout=60,
        )

    def remove(self):
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def create_database(self, name):
        subprocess.run(
            [f"{PG_BIN}/createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def dsn(self, database):
        return f"host=127.0.0.1 port={self.port} dbname={database} user=postgres"


class PowerDNS:
    def __init__(self, directory, postgresql, database):
        self.directory = os.path.join(directory, f"pdns-{database}")
        os.makedirs(self.directory, exist_ok=True)
        self.port = free_port()
        config = {
            "launch": "gpgsql",
            "gpgsql-host": "127.0.0.1",
            "gpgsql-port": postgresql.port,
            "gpgsql-dbname": database,
            "gpgsql-user": "postgres",
            "local-address": "127.0.0.1",
            "local-port": self.port,
            "enable-lua-records": "yes",
            # What thor-dns needs of PowerDNS: no caches between a change and the answers.
            "cache-ttl": 0,
            "query-cache-ttl": 0,
            "negquery-cache-ttl": 0,
            "zone-cache-refresh-interval": 0,
            "socket-dir": self.directory,
            "webserver": "no",
            "security-poll-suffix": "",  # no queries to the outside world
            "api": "no",
        }
        with open(os.path.join(self.directory, "pdns.conf"), "w") as stream:
            stream.writelines(f"{key}={value}\n" for key, value in config.items())
        self.log_path = os.path.join(self.directory, "pdns.log")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [
                    "pdns_server",
                    f"--config-dir={self.directory}",
                    "--guardian=no",
                    "--daemon=no",
                    "--disable-syslog",
                    "--write-pid=no",
                ],
                stdout=log,
                stderr=log,
            )
        wait_for(
            lambda: "Done launching threads" in self._log() or self.process.poll() is not None,
            timeout=20,
            message="PowerDNS started",
        )
        if self.process.poll() is not None:
            raise RuntimeError(f"pdns_server exited: {self._log()}")

    def _log(self):
        with open(self.log_path, errors="replace") as stream:
            return stream.read()

    @property
    def address(self):
        return ("127.0.0.1", self.port)

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            exited(self.process, 10)
