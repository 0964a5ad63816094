"""``edgefleet-agent``: run the device agent.

    edgefleet-agent run --config /etc/edgefleet/agent.toml
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from edgefleet.agent import __version__
from edgefleet.agent.contract.config import load_agent_config
from edgefleet.agent.contract.errors import EdgefleetError

__all__ = ["main"]


def _run(args: argparse.Namespace) -> int:
    from edgefleet.agent.adapters.sdnotify import Notifier
    from edgefleet.agent.adapters.store import empty_directory
    from edgefleet.agent.app.daemon import Agent

    config = load_agent_config(Path(args.config).resolve())  # absolute paths: we chdir next
    # ONNX Runtime resolves a model's relative external-data paths against the working directory
    # (sessions are opened from bytes): run where there is nothing to find (docs/security.md).
    os.chdir(empty_directory(config.state_dir / "empty"))
    agent = Agent(config, notify=Notifier())
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent.start()
    stop.wait()
    logging.getLogger("edgefleet.agent").info("stopping")
    agent.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgefleet-agent", description="edgefleet device agent")
    parser.add_argument("--version", action="version", version=f"edgefleet-agent {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the agent (foreground; logs to stdout)")
    run.add_argument("--config", required=True, help="agent.toml written by `edgefleet-hub device add`")
    run.set_defaults(func=_run)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stdout,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return int(args.func(args))
    except EdgefleetError as exc:
        print(f"edgefleet-agent: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
