"""The session guard: open the first ONNX Runtime session on a new blob in a child process.

A model that passed its signature, its hash and :func:`agent.adapters.modelcheck.check_model_bytes` is still
untrusted input to ONNX Runtime's C++ parser and optimiser. :class:`SessionGuard` runs
``python -m agent.guard_child`` with an address-space limit (``RLIMIT_AS``) and a timeout. A child
that is killed by a signal, runs out of time or memory, or reports a load error means the model
is refused with :class:`~agent.contract.errors.ModelRejected`; the agent itself never loads it.

Refusal reasons: ``guard_crash`` (the child died from a signal or without an answer),
``guard_timeout``, ``guard_memory``, and the structural reasons of :mod:`agent.adapters.modelcheck`.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from edgefleet.agent.contract.errors import ModelRejected

__all__ = ["SessionGuard"]


class SessionGuard:
    """Callable seam: ``guard(path)`` returns ``None`` or raises ModelRejected."""

    def __init__(
        self,
        *,
        budget_mb: int = 512,
        timeout: float = 60.0,
        threads: int = 1,
        opt_level: str = "all",
        command: Sequence[str] | None = None,
    ) -> None:
        self.budget_mb = budget_mb
        self.timeout = timeout
        self.threads = threads
        self.opt_level = opt_level
        # ``command`` replaces ``python -m agent.guard_child`` (tests use a child that hangs).
        self.command = list(command) if command else [sys.executable, "-m", "edgefleet.agent.adapters.sandbox_child"]

    def __call__(self, path: Path) -> None:
        argv = [
            *self.command,
            str(path.resolve()),
            "--budget-mb",
            str(self.budget_mb),
            "--threads",
            str(self.threads),
            "--opt-level",
            self.opt_level,
        ]
        try:
            # The child works in an empty folder: a model reference relative to the working
            # directory (external data that slipped past the structural checks) finds nothing.
            with tempfile.TemporaryDirectory(prefix="edgefleet-guard-") as empty:
                res = subprocess.run(
                    argv,
                    capture_output=True,
                    timeout=self.timeout,
                    stdin=subprocess.DEVNULL,
                    check=False,
                    cwd=empty,
                )
        except subprocess.TimeoutExpired as exc:
            raise ModelRejected(
                f"ONNX Runtime did not finish opening {path.name[:16]}… within {self.timeout:g} s "
                "in the guard process; the model is refused (raise the guard timeout if it is "
                "legitimately slow to load)",
                reason="guard_timeout",
            ) from exc
        except OSError as exc:
            raise ModelRejected(
                f"could not start the guard process: {exc}", reason="guard_crash"
            ) from exc
        answer: dict[str, object] = {}
        for line in reversed(res.stdout.decode(errors="replace").splitlines()):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                answer = obj
                break
        if res.returncode == 0 and answer.get("ok") is True:
            return
        if answer.get("ok") is False:
            raise ModelRejected(
                f"model refused by the guard process: {answer.get('message')}",
                reason=str(answer.get("reason") or "model_rejected"),
            )
        if res.returncode < 0:
            try:
                how = f"signal {signal.Signals(-res.returncode).name}"
            except ValueError:
                how = f"signal {-res.returncode}"
        else:
            how = f"exit status {res.returncode}"
        tail = res.stderr.decode(errors="replace").strip()[-300:]
        raise ModelRejected(
            f"the guard process opening {path.name[:16]}… died ({how}) with a "
            f"{self.budget_mb} MiB memory budget; the model is refused. {tail}",
            reason="guard_crash",
        )
