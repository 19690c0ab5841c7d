"""The shape every Thor program shares.

Parse the command line (--config, --debug, --version and the program's own
options), configure logging to stderr under the program's name, load the
configuration sections the program declares, build the daemon and run it in
the foreground until TERM or INT. HUP reloads (the TLS files at least), USR1
toggles debug logging. A configuration or start-up error is one line on
stderr and exit status 78 (EX_CONFIG), so supervisor's log says what to fix.

Entry points call gevent.monkey.patch_all() before importing this module.
"""

import argparse
import logging
import os
import resource
import signal
import sys

import gevent
from gevent.event import Event

from thor import __version__
from thor.config import DEFAULT_CONFIG_PATH, ConfigError, TLSConfig, load_config
from thor.metrics import MetricsConfig, MetricsServer, gauge, tls_expiry_families
from thor.transport.tls import TLSContexts, TLSError

__all__ = ["EX_CONFIG", "Daemon", "StartupError", "configure_logging", "raise_file_limit", "run"]

EX_CONFIG = 78

LOG_FORMAT = "%(asctime)s {program}[%(process)d] %(levelname)s %(name)s: %(message)s"


class StartupError(Exception):
    """A daemon cannot start; str() is one line for the operator."""


class Daemon:
    """Base of the Thor daemons.

    Subclasses set `program` and `sections` (the configuration section
    classes they read; TLSConfig gives them self.tls), and implement start()
    (start serving without blocking) and stop() (stop serving, bounded in
    time). self.config maps each section class to its loaded instance.
    """

    program = "thor"
    description = None
    sections = (TLSConfig,)

    def __init__(self, config, options):
        self.config = config
        self.options = options
        self.log = logging.getLogger(self.program)
        self.stopping = Event()
        self.exit_status = 0
        self.tls = None
        tls_config = config.get(TLSConfig)
        if tls_config is not None:
            try:
                self.tls = TLSContexts.from_config(tls_config)
            except TLSError as error:
                raise StartupError(str(error)) from None
            self.tls.watch(tls_config.crl_check_interval)

    @classmethod
    def add_arguments(cls, parser):
        """Add the program's own command line options."""

    def start(self):
        raise NotImplementedError

    def finish(self, status=0):
        """End the program from within (a one-shot command), as TERM would, with status."""
        self.exit_status = status
        self.stopping.set()

    def stop(self):
        if self.tls is not None:
            self.tls.stop_watching()

    def reload(self):
        if self.tls is not None:
            self.tls.reload()

    def metric_families(self):
        """The program's metric families at a scrape (docs/metrics.md); subclasses add theirs."""
        yield gauge(
            "thor_build_info",
            "The program and its version.",
            labels=["program", "version"],
            samples=[([self.program, __version__], 1)],
        )
        if self.tls is not None:
            yield from tls_expiry_families(self.tls)


def raise_file_limit(wanted):
    """Raise the soft limit of open files toward wanted (never above the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target < wanted:
        logging.getLogger("thor").warning(
            "open files limit: %d wanted, the hard limit is %d; raise it (supervisor minfds) "
            "or lower the connection limits",
            wanted,
            hard,
        )
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        logging.getLogger("thor").info("open files limit raised from %d to %d", soft, target)


def configure_logging(program, debug=False):
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT.format(program=program)))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)


def _toggle_debug(log):
    root = logging.getLogger()
    debug = root.level != logging.DEBUG
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    log.info("debug logging %s", "on" if debug else "off")


def run(daemon_class, argv=None):
    """Run daemon_class in the foreground; returns the process exit status."""
    parser = argparse.ArgumentParser(prog=daemon_class.program, description=daemon_class.description)
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=None,
        help=f"configuration file (default: {DEFAULT_CONFIG_PATH})",
    )
    parser.add_argument("--debug", action="store_true", help="log debug messages (SIGUSR1 toggles)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    daemon_class.add_arguments(parser)
    options = parser.parse_args(argv)
    program = daemon_class.program
    configure_logging(program, options.debug)
    log = logging.getLogger(program)

    section_classes = (*daemon_class.sections, MetricsConfig)
    metrics = None
    try:
        path = options.config or DEFAULT_CONFIG_PATH
        sections = load_config(path, *section_classes, required=options.config is not None)
        config = dict(zip(section_classes, sections, strict=True))
        daemon = daemon_class(config, options)
        metrics = _metrics_server(daemon, config[MetricsConfig])
        daemon.start()
    except (ConfigError, StartupError) as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        return EX_CONFIG
    if metrics is not None:
        metrics.start()

    stopping = daemon.stopping

    def request_stop(signum):
        if stopping.is_set():
            log.warning("second %s: exiting at once", signal.Signals(signum).name)
            sys.stderr.flush()
            os._exit(1)
        log.info("%s received, stopping", signal.Signals(signum).name)
        stopping.set()

    gevent.signal_handler(signal.SIGTERM, request_stop, signal.SIGTERM)
    gevent.signal_handler(signal.SIGINT, request_stop, signal.SIGINT)
    gevent.signal_handler(signal.SIGHUP, lambda: gevent.spawn(_reload, daemon, log))
    gevent.signal_handler(signal.SIGUSR1, _toggle_debug, log)
    log.info("%s %s started", program, __version__)
    stopping.wait()
    if metrics is not None:
        metrics.stop()
    daemon.stop()
    log.info("%s stopped", program)
    return daemon.exit_status


def _metrics_server(daemon, config):
    """The program's metrics server with its port taken, or None when [Metrics] turns it off."""
    listen = config.listen_of(daemon.program)
    if listen is None:
        return None
    server = MetricsServer(listen, daemon.metric_families, config.allow)
    try:
        server.bind()
    except OSError as error:
        raise StartupError(
            f"cannot serve metrics on {listen[0]}:{listen[1]} ([Metrics] {daemon.program.removeprefix('thor-')}): "
            f"{error.strerror or error}"
        ) from None
    return server


def _reload(daemon, log):
    log.info("SIGHUP received, reloading")
    try:
        daemon.reload()
    except Exception:
        log.exception("reload failed")
