"""`python -m warmsocket.netem check | run | proxy | cleanup | list`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from warmsocket.cli import _port
from warmsocket.netem.cleanup import cleanup, inventory
from warmsocket.netem.commands import CommandError, Tools, find_tools, run_command
from warmsocket.netem.link import EmulatedLink, LinkUnavailable
from warmsocket.netem.measure import MAX_BULK_BYTES, LinkMeasurement, format_mbit, measure_link
from warmsocket.netem.plan import DEFAULT_PREFIX, validate_prefix
from warmsocket.netem.profiles import BUILTIN_PROFILES, NetworkProfile, get_profile
from warmsocket.netem.timers import TimerfdScheduler

_CHECK_TIMEOUT = 60.0
# Signals that stop `run` and `check`. SIGINT is taken over from asyncio so that all
# three go through one handler that lets a stop already under way finish: asyncio's
# own would cancel the teardown part-way (and a further Ctrl-C raise
# KeyboardInterrupt wherever the loop happens to be).
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# What `run` passes on to its command.
_PASSED_ON = (signal.SIGTERM, signal.SIGHUP)
_CHILD_GRACE_S = 5.0  # how long `run` waits for its command after passing a signal on


def _run(coro: Coroutine[Any, Any, Any], loop_name: str) -> Any:
    if loop_name == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


@dataclass(slots=True)
class _Stop:
    """Whether `run` or `check` is stopping, and the stop signal that arrived, if any."""

    signum: int | None = None
    stopping: bool = False  # set by the first stop signal, or by `run --timeout`

    def passed_on(self) -> int:
        """The signal for the command: the one received, but SIGTERM for --timeout
        and for Ctrl-C (the terminal has already sent the command its own SIGINT)."""
        if self.signum is not None and self.signum in _PASSED_ON:
            return self.signum
        return signal.SIGTERM


async def _stoppable(main: Callable[[_Stop], Coroutine[Any, Any, int]]) -> int:
    """Run main; SIGINT/SIGTERM/SIGHUP cancel it, and the exit status is 128 + signal.

    Cancelling (instead of dying of the signal) lets every `async with` unwind:
    the command is stopped, the proxy closed, the namespace and veth removed.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    stop = _Stop()

    def on_signal(signum: int) -> None:
        if stop.stopping:
            # A second signal, or one after --timeout began stopping the command:
            # cancelling now would cut the command's grace period short and skip
            # its kill, leaving it running after `run` exits.
            print(
                f"netem: {signal.Signals(signum).name}: already stopping (a command "
                f"still running is killed {_CHILD_GRACE_S:g} s after its signal)",
                file=sys.stderr,
            )
            return
        stop.signum = signum
        stop.stopping = True
        task.cancel()

    previous = {sig: signal.getsignal(sig) for sig in _STOP_SIGNALS if _stops_us(sig)}
    for sig in previous:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        return await main(stop)
    except asyncio.CancelledError:
        if stop.signum is None:
            raise
        print(f"netem: stopped by {signal.Signals(stop.signum).name}", file=sys.stderr)
        return 128 + stop.signum
    finally:
        for sig, handler in previous.items():
            loop.remove_signal_handler(sig)
            # What was there before (asyncio's SIGINT handler), not the default
            # remove_signal_handler leaves.
            if handler is not None:
                signal.signal(sig, handler)


def _stops_us(sig: int) -> bool:
    """Whether `sig` had its usual effect, ending the process, when we started. One
    ignored then stays ignored: `nohup` ignores SIGHUP so that closing the terminal
    does not stop the run, and `cmd &` in a script starts it with SIGINT ignored."""
    handler = signal.getsignal(sig)
    if sig == signal.SIGINT:  # Python's (or asyncio's) KeyboardInterrupt handler
        return handler is not signal.SIG_IGN
    return handler is signal.SIG_DFL


def probe_netem_qdisc(link: EmulatedLink) -> str:
    """Try a netem qdisc on the client namespace's loopback (harmless there)."""
    tools = find_tools()
    if isinstance(tools, str) or link.netns is None:
        return "not probed"
    argv = [
        tools.tc,
        "-n",
        link.netns,
        "qdisc",
        "add",
        "dev",
        "lo",
        "root",
        "netem",
        "delay",
        "1ms",
    ]
    try:
        run_command(argv, timeout=5)
    except CommandError as exc:
        return f"unavailable ({exc.detail or exc})"
    run_command([tools.tc, "-n", link.netns, "qdisc", "del", "dev", "lo", "root"], check=False)
    return "available (not used: delay is done by the proxy)"


async def _timerfd_status() -> str:
    try:
        TimerfdScheduler(asyncio.get_running_loop()).close()
    except OSError as exc:
        return f"unavailable, using loop.call_at (ms precision): {exc}"
    return "available (ns-precision delay timers)"


async def _check_profile(
    profile: NetworkProfile, args: argparse.Namespace, first: bool
) -> tuple[EmulatedLink, LinkMeasurement | None, str | None, str | None]:
    async with EmulatedLink(profile, prefix=args.prefix) as link:
        netem = probe_netem_qdisc(link) if first and link.emulated else None
        try:
            result = await measure_link(
                link, rtt_samples=args.samples, bulk_bytes=args.bulk_bytes, timeout=args.timeout
            )
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            return link, None, netem, f"{type(exc).__name__}: {exc}"
        return link, result, netem, None


async def _check(args: argparse.Namespace) -> int:
    out: dict[str, object] = {}
    tools = find_tools()
    env = {
        "platform": sys.platform,
        "root": os.geteuid() == 0 if hasattr(os, "geteuid") else False,
        "iproute2": tools if isinstance(tools, str) else f"ip={tools.ip} tc={tools.tc}",
        "timerfd": await _timerfd_status(),
        "event_loop": args.loop,
    }
    out["environment"] = env
    if not args.json:
        print("netem check")
        for key, value in env.items():
            print(f"  {key:<10} {value}")
    results = []
    netem_status: str | None = None
    for i, name in enumerate(args.profile or list(BUILTIN_PROFILES)):
        profile = get_profile(name)
        link, result, netem, error = await _check_profile(profile, args, first=netem_status is None)
        netem_status = netem_status or netem
        row: dict[str, object] = {
            "profile": profile.name,
            "nominal": profile.describe(),
            "emulated": link.emulated,
            "fallback_reason": link.fallback_reason,
            "measurement": result.as_dict() if result else None,
            "error": error,
        }
        tbf = profile.tbf()
        row["tbf"] = " ".join(tbf.tc_args()) if tbf else None
        results.append(row)
        if not args.json:
            if i == 0 or netem is not None:
                if netem is not None:
                    print(f"  {'netem':<10} {netem}")
                print()
            _print_row(profile, link, result, error)
    out["profiles"] = results
    if args.json:
        print(json.dumps(out, indent=2))
    return 0


def _print_row(
    profile: NetworkProfile, link: EmulatedLink, result: LinkMeasurement | None, error: str | None
) -> None:
    print(f"{profile.describe()}")
    if link.emulated and link.plan:
        tbf = profile.tbf()
        print(
            f"  link:     namespace {link.plan.netns}, client {link.client_host} -> "
            f"proxy on {link.server_host} -> 127.0.0.1"
        )
        print(f"  rate:     {'tc ' + ' '.join(tbf.tc_args()) if tbf else 'unlimited'}")
    else:
        print(f"  link:     loopback ({link.fallback_reason}); rate by {link.rate_limiter}")
    if error is not None:
        print(f"  measure:  FAILED: {error}")
        return
    assert result is not None
    rate = "" if profile.rate_mbit is None else f" (nominal {profile.rate_mbit:g})"
    print(
        f"  RTT:      {result.rtt_ms:.2f} ms median (nominal {profile.rtt_ms:g}; "
        f"min {result.rtt_min_ms:.2f}, max {result.rtt_max_ms:.2f})"
    )
    print(f"  connect:  {result.connect_rtt_ms:.2f} ms for TCP connect + first echo")
    print(
        f"  rate:     down {format_mbit(result.down_mbit)}, "
        f"up {format_mbit(result.up_mbit)}{rate}, "
        f"{result.bulk_bytes / 1e6:.1f} MB each way"
    )
    print()


def _tools_or_report() -> Tools | None:
    tools = find_tools()
    if isinstance(tools, str):
        print(f"netem: {tools}")
        return None
    return tools


def _cleanup(args: argparse.Namespace) -> int:
    tools = _tools_or_report()
    if tools is None:
        return 1
    if os.geteuid() != 0:
        print("netem cleanup: needs root (removing namespaces and links needs CAP_SYS_ADMIN)")
        return 1
    try:
        report = cleanup(tools, prefix=args.prefix, include_live=args.all)
    except (CommandError, OSError, TimeoutError, ValueError) as exc:
        print(f"netem cleanup failed: {exc}")
        return 1
    print(f"netem cleanup: {report.summary()}")
    return 1 if report.errors else 0


def _list(args: argparse.Namespace) -> int:
    tools = _tools_or_report()
    if tools is None:
        return 1
    try:
        inv = inventory(run_command, tools, args.prefix)
    except (CommandError, OSError, ValueError) as exc:
        print(f"netem list failed: {exc}")
        return 1
    if inv.empty:
        print(f"no {args.prefix}* namespaces or links")
    for ns in inv.netns:
        print(f"netns {ns}")
    for link in inv.links:
        print(f"link  {link.name} {' '.join(link.addresses)} [{link.alias or 'no owner'}]")
    return 0


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


async def _stop_child(proc: asyncio.subprocess.Process, signum: int) -> None:
    """Pass `signum` on to the command; kill it if it outlives the grace period.

    Also killed when this wait is cancelled: the command must not outlive `run`
    (left running, reparented to init, in a namespace that is then removed).
    """
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signum)
    try:
        async with asyncio.timeout(_CHILD_GRACE_S):
            await proc.wait()
    except TimeoutError:
        pass
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


async def _run_command(args: argparse.Namespace, stop: _Stop) -> int:
    """Link + proxy in front of --target, then the command in the client namespace."""
    target_host, target_port = args.target
    profile = get_profile(args.profile)
    async with EmulatedLink(profile, prefix=args.prefix, require=args.require) as link:
        proxy = await link.start_proxy(target_host, target_port, listen_port=args.listen_port)
        print(f"netem: {link.describe()}", file=sys.stderr)
        print(
            f"netem: proxy {proxy.host}:{proxy.port} -> {target_host}:{target_port}",
            file=sys.stderr,
        )
        if args.measure:
            result = await measure_link(link, rtt_samples=10)
            print(f"netem: achieved {result.summary()}", file=sys.stderr)
        subst = {"{host}": proxy.host, "{port}": str(proxy.port)}
        argv = [_substitute(a, subst) for a in args.cmd]
        env = dict(os.environ)
        env.update(
            NETEM_HOST=proxy.host,
            NETEM_PORT=str(proxy.port),
            NETEM_PROFILE=profile.name,
            NETEM_EMULATED="1" if link.emulated else "0",
        )
        proc = await asyncio.create_subprocess_exec(*link.client_command(argv), env=env)
        try:
            async with asyncio.timeout(args.timeout):
                return await proc.wait()
        except TimeoutError:
            print(
                f"netem: command still running after {args.timeout:g} s, stopping it",
                file=sys.stderr,
            )
            return 124
        finally:
            if proc.returncode is None:
                stop.stopping = True  # from here on a signal must not interrupt the stop
                await _stop_child(proc, stop.passed_on())


# Option types: a bad value is a usage error (exit 2) here, not a traceback later.


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected an integer {low}..{high}, got {text!r}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def _prefix(text: str) -> str:
    try:
        validate_prefix(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _substitute(arg: str, subst: dict[str, str]) -> str:
    for key, value in subst.items():
        arg = arg.replace(key, value)
    return arg


async def _proxy(args: argparse.Namespace) -> int:
    """A standalone delay proxy (no namespace), until SIGINT/SIGTERM or --duration."""
    from warmsocket.netem.proxy import DelayProxy

    profile = get_profile(args.profile)
    listen_host, listen_port = args.listen
    target_host, target_port = args.target
    proxy = DelayProxy.from_profile(
        profile,
        target_host,
        target_port,
        rate_limit=args.rate_limit,
        listen_host=listen_host,
        listen_port=listen_port,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with proxy:
        print(
            f"netem proxy {proxy.host}:{proxy.port} -> {target_host}:{target_port}, "
            f"{profile.describe()}{'' if args.rate_limit else ' (rate not applied)'}",
            flush=True,
        )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(args.duration):
                await stop.wait()
    return 0


def _add_common_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """--prefix and -v, taken before the subcommand and after it.

    Only the top-level parser sets defaults: on a subcommand they are
    suppressed, so leaving them out there keeps a value given before it.
    """
    parser.add_argument(
        "--prefix",
        type=_prefix,
        default=DEFAULT_PREFIX if defaults else argparse.SUPPRESS,
        help="name prefix of harness objects",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=False if defaults else argparse.SUPPRESS,
        help="log what the harness does",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m warmsocket.netem",
        description="Network emulation harness: namespaces + tbf + delay proxy.",
    )
    _add_common_options(parser, defaults=True)
    common = argparse.ArgumentParser(add_help=False)
    _add_common_options(common, defaults=False)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser(
        "check", parents=[common], help="probe capabilities and measure each profile"
    )
    check.add_argument(
        "--profile",
        action="append",
        choices=[p.lower() for p in BUILTIN_PROFILES] + list(BUILTIN_PROFILES),
        help="profile to measure (repeatable; default: all)",
    )
    check.add_argument(
        "--samples", type=_int_in(1, 100_000), default=20, help="RTT samples per profile"
    )
    check.add_argument(
        "--bulk-bytes",
        type=_int_in(1, MAX_BULK_BYTES),
        default=None,
        help="bytes per bulk transfer",
    )
    check.add_argument(
        "--timeout", type=_seconds, default=_CHECK_TIMEOUT, help="seconds per profile"
    )
    check.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    profiles = [p.lower() for p in BUILTIN_PROFILES] + list(BUILTIN_PROFILES)
    runp = sub.add_parser(
        "run",
        parents=[common],
        help="set up a link and a proxy to --target, run a command in the client namespace",
        description="Placeholders {host} and {port} in the command are replaced by the "
        "proxy's address; it is also exported as NETEM_HOST / NETEM_PORT.",
    )
    runp.add_argument("--profile", choices=profiles, default="WAN")
    runp.add_argument("--target", type=_host_port, required=True, help="real server HOST:PORT")
    runp.add_argument("--listen-port", type=_port, default=0, help="proxy port (default: any)")
    runp.add_argument("--require", action="store_true", help="fail instead of falling back")
    runp.add_argument("--measure", action="store_true", help="measure the link first")
    runp.add_argument(
        "--timeout", type=_seconds, default=3600.0, help="stop the command after this many seconds"
    )
    runp.add_argument("cmd", nargs="+", help="the command (put it after --)")
    px = sub.add_parser(
        "proxy", parents=[common], help="run a standalone delay proxy (no namespace)"
    )
    px.add_argument("--profile", choices=profiles, default="WAN")
    px.add_argument("--listen", type=_host_port, default=("127.0.0.1", 0), help="HOST:PORT")
    px.add_argument("--target", type=_host_port, required=True, help="real server HOST:PORT")
    px.add_argument("--rate-limit", action="store_true", help="also apply the profile's rate")
    px.add_argument("--duration", type=_seconds, default=24 * 3600.0, help="stop after seconds")
    px.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    cl = sub.add_parser(
        "cleanup", parents=[common], help="remove namespaces/links left by crashed runs"
    )
    cl.add_argument("--all", action="store_true", help="also remove those of running harnesses")
    sub.add_parser("list", parents=[common], help="list harness namespaces and links")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "check": lambda a: int(_run(_stoppable(lambda _stop: _check(a)), a.loop)),
        "run": lambda a: int(_run(_stoppable(lambda stop: _run_command(a, stop)), "asyncio")),
        "proxy": lambda a: int(_run(_proxy(a), a.loop)),
        "cleanup": _cleanup,
        "list": _list,
    }
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except LinkUnavailable as exc:
        # `run --require`: the expected outcome without root or iproute2, so the
        # reason alone (it names the failing step), without a traceback.
        print(f"netem: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # Output piped into e.g. `head`: not an error worth a traceback.
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        return 0
