"""``geoproxy run | check-config | route | stamp | demo``: owns the process, logging and
signals."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from geoproxy import __version__
from geoproxy.config import loader as config_mod
from geoproxy.errors import GeoproxyError
from geoproxy.process import demo
from geoproxy.process.offline import check_config, route_cmd
from geoproxy.process.server import Bound, serve
from geoproxy.process.supervisor import MAX_WORKERS, serve_workers
from geoproxy.process.worker import die_with_supervisor, serve_worker
from geoproxy.proxy import compat
from geoproxy.stamp import config as stamp_config
from geoproxy.stamp.serve import serve_stamp
from geoproxy.surfaces.logs import setup_logging

DEFAULT_CONFIG = "config/geoproxy.yaml"
_DESCRIPTION = "geoproxy: a geo-routing edge reverse proxy in front of regional stamps."
#: The commands ``--help`` lists; ``worker`` is internal (``run --workers`` starts it).
_COMMANDS = "{run,check-config,route,stamp,demo}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="geoproxy", description=_DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"geoproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar=_COMMANDS)
    config_help = f"config file (default: {DEFAULT_CONFIG}, relative to the current directory)"

    run = sub.add_parser("run", help="run the proxy")
    run.add_argument("--config", default=DEFAULT_CONFIG, help=config_help)
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    run.add_argument(
        "--workers",
        type=_workers_arg,
        default=1,
        metavar="N",
        help="worker processes sharing the proxy port (SO_REUSEPORT), or "
        "'auto' for one per usable CPU core (default: %(default)s)",
    )

    wkr = sub.add_parser("worker")  # no help: not listed; one process of run --workers
    wkr.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    wkr.add_argument("--index", type=int, required=True)
    wkr.add_argument("--listen-fd", type=int, action="append", required=True)
    wkr.add_argument("--control-fd", type=int, required=True)
    wkr.add_argument("--supervisor-pid", type=int, required=True)
    wkr.add_argument("--geoip-fd", type=int)  # the GeoIP database the supervisor opened

    check = sub.add_parser("check-config", help="validate a config and print its topology")
    check.add_argument("--config", default=DEFAULT_CONFIG, help=config_help)

    rte = sub.add_parser("route", help="explain where a client would be sent (offline)")
    rte.add_argument("--config", default=DEFAULT_CONFIG, help=config_help)
    rte.add_argument("--ip", help="the client's real IP (looked up in the GeoIP database)")
    rte.add_argument("--country", help="as sent in CF-IPCountry, e.g. JP")
    rte.add_argument("--region", help="as sent in X-Client-Region: a region id or country")
    rte.add_argument("--path", help="a request path: which access rule it meets")
    rte.add_argument("--home-cookie", help="a home cookie's value (home_affinity.cookie)")
    rte.add_argument("--tenant", help="a tenant key (home_affinity.tenants)")
    rte.add_argument("--json", action="store_true", help="print the explanation as JSON")

    stm = sub.add_parser("stamp", help="run one reference stamp")
    stm.add_argument("--config", required=True, help="stamp config file")
    stm.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    stm.add_argument(
        "--allow-clock-ahead",
        action="store_true",
        help="start even though the stamp's last version is further ahead of "
        "this machine's clock than max_clock_skew",
    )

    dem = sub.add_parser("demo", help="run the proxy in front of three local stamps")
    dem.add_argument(
        "--data-dir",
        help="where the stamps keep their SQLite files "
        "(default: a new temporary folder, removed on exit)",
    )
    dem.add_argument(
        "--tls",
        action="store_true",
        help="stamps on HTTPS with a throwaway CA made for this run, mutual TLS between them",
    )
    dem.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])

    args = parser.parse_args(argv)
    if args.command == "check-config":
        return check_config(Path(args.config))
    if args.command == "route":
        return route_cmd(
            Path(args.config),
            args.ip,
            args.country,
            args.region,
            args.json,
            args.path,
            args.home_cookie,
            args.tenant,
        )
    if args.command == "worker":
        setup_logging(args.log_level, f"worker-{args.index}")
        compat.warn_if_public()
        return _worker_cmd(args)
    setup_logging(args.log_level)
    if args.command in ("run", "demo"):
        compat.warn_if_public()
    if args.command == "run":
        return _run_cmd(Path(args.config), args.workers, args.log_level)
    if args.command == "stamp":
        return _stamp_cmd(Path(args.config), args.allow_clock_ahead)
    return _demo_cmd(Path(args.data_dir) if args.data_dir else None, args.tls)


def _fail(message: str, who: str = "geoproxy") -> int:
    print(f"{who}: {message}", file=sys.stderr)
    return 1


def _workers_arg(text: str) -> int:
    if text == "auto":
        return (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else (os.cpu_count() or 1)
        )
    try:
        count = int(text)
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(
            f"expected a whole number from 1 to {MAX_WORKERS}, or 'auto'; got {text!r}"
        )
    return count


def _run_cmd(path: Path, workers: int = 1, log_level: str = "info") -> int:
    try:
        cfg = config_mod.load(path)
    except GeoproxyError as exc:
        return _fail(f"{path}: configuration is invalid\n{exc}")
    for line in cfg.warnings:
        logging.getLogger("geoproxy").warning("%s", line)
    if workers == 1:
        return _run_main(lambda stop, reload: serve(cfg, stop, reload=reload))
    return _run_main(
        lambda stop, reload: serve_workers(cfg, workers, stop, reload, log_level=log_level)
    )


def _worker_cmd(args: argparse.Namespace) -> int:
    """One worker of ``run --workers``: its sockets, config and health come from the
    supervisor."""
    die_with_supervisor(args.supervisor_pid)
    sockets = [socket.socket(fileno=fd) for fd in args.listen_fd]
    control = socket.socket(fileno=args.control_fd)
    return _run_main(
        lambda stop, _reload: serve_worker(sockets, control, stop, args.geoip_fd),
        f"geoproxy worker {args.index}",
    )


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when it is installed (a dependency on Linux and macOS): the same asyncio API,
    with the event loop and socket I/O in C. GEOPROXY_LOOP=asyncio opts out."""
    if os.environ.get("GEOPROXY_LOOP", "").lower() == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _run_main(
    start: Callable[[asyncio.Event, asyncio.Event], Awaitable[None]], who: str = "geoproxy"
) -> int:
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(_serve_with_signals(start))
    except GeoproxyError as exc:
        return _fail(str(exc), who)
    return 0


async def _serve_with_signals(
    start: Callable[[asyncio.Event, asyncio.Event], Awaitable[None]],
) -> None:
    """Run ``start(stop, reload)``. The first SIGINT or SIGTERM sets ``stop`` (a graceful
    stop); a second one cancels everything at once, without waiting for in-flight
    requests. SIGHUP sets ``reload``."""
    stop = asyncio.Event()
    reload = asyncio.Event()
    signalled = False  # not stop.is_set(): a worker's stop may come from its supervisor

    def on_signal() -> None:
        nonlocal signalled
        if signalled:
            # Cancelling would not do: a drain in progress may shield itself from it.
            logging.getLogger("geoproxy").warning("second signal: stopping at once")
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        signalled = True
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    loop.add_signal_handler(signal.SIGHUP, reload.set)
    try:
        await start(stop, reload)
    finally:
        # Done (drained, or failed to start): what is left is closing the loop and
        # exiting. A signal now (a worker's own SIGTERM behind its supervisor's word)
        # must not kill the process on the way out, its default action once the loop's
        # handlers are gone.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)


def _stamp_cmd(path: Path, allow_clock_ahead: bool = False) -> int:
    try:
        cfg = stamp_config.load(path)
    except GeoproxyError as exc:
        return _fail(f"{path}: configuration is invalid\n{exc}")
    cfg = dataclasses.replace(cfg, allow_clock_ahead=allow_clock_ahead)
    return _run_main(lambda stop, _reload: serve_stamp(cfg, stop))


def _demo_cmd(data_dir: Path | None, tls: bool = False) -> int:
    path = demo.demo_config_path()
    try:
        cfg = config_mod.load(path)
    except GeoproxyError as exc:
        return _fail(f"shipped demo config is invalid (a packaging bug):\n{exc}")
    temporary = data_dir is None
    folder = Path(tempfile.mkdtemp(prefix="geoproxy-demo-")) if data_dir is None else data_dir
    try:
        folder.mkdir(parents=True, exist_ok=True)
        demo_files = demo.write_stamp_configs(cfg, folder, tls)
    except OSError as exc:
        return _fail(
            f"--data-dir {folder}: cannot write the stamps' files there: {exc.strerror or exc}"
        )

    async def run_demo(stop: asyncio.Event, _reload: asyncio.Event) -> None:
        live, stamps = demo_files
        watcher: asyncio.Task[None] | None = None
        try:
            await demo.start_stamps(stamps)
            for s in stamps:
                g, pid = s.geode, s.proc.pid if s.proc else "-"
                print(
                    f"stamp {g.name:<18} region {g.region:<14} {g.url}  pid {pid}  (peer "
                    f"listener, /metrics: {s.peer_url})",
                    flush=True,
                )
            print(
                f"stamp data and configs: {folder}" + (" (removed on exit)" if temporary else ""),
                flush=True,
            )
            if tls:
                print(
                    f"TLS: the stamps serve HTTPS with certificates from a throwaway CA "
                    f"({folder / 'ca.pem'}) and authenticate each other by mutual TLS",
                    flush=True,
                )
            watcher = asyncio.create_task(demo.report_exits(stamps), name="demo-stamp-exits")

            def ready(bound: Bound) -> None:
                print(
                    f"\ngeoproxy demo is up (config: {path})\n"
                    f"  proxy: {bound.proxy_url}\n  admin: {bound.admin_url}\n\nTry:\n"
                    f"{demo.curl_lines(bound.proxy_url, bound.admin_url)}\n\n"
                    f"{demo.break_lines(stamps, bound.admin_url)}\n\n"
                    "Ctrl-C stops everything.",
                    flush=True,
                )

            # No SIGHUP reload: the demo's geode ports were chosen at run time.
            await serve(live, stop, on_ready=ready, any_port_if_taken=True)
        finally:
            if watcher is not None:
                watcher.cancel()
            await asyncio.gather(*(s.stop() for s in stamps))
        print("geoproxy demo stopped.", flush=True)

    try:
        return _run_main(run_demo)
    finally:
        if temporary:
            shutil.rmtree(folder, ignore_errors=True)
