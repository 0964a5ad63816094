"""Child process of the session guard: ``python -m edgefleet.agent.adapters.sandbox_child PATH --budget-mb N``.

Runs the structural checks, then caps its own address space (``RLIMIT_AS`` = what it already
maps plus the budget) and opens a first ONNX Runtime session on the blob. It prints one JSON
line, ``{"ok": true}`` or ``{"ok": false, "reason": ..., "message": ...}``. If ONNX Runtime
crashes or hangs, the parent (:mod:`agent.adapters.sandbox`) sees a signal or a timeout instead: this
process exists so that neither can happen to the agent.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

import onnxruntime as ort
import psutil

from edgefleet.agent.adapters.modelcheck import check_model_bytes
from edgefleet.agent.contract.errors import EdgefleetError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgefleet.agent.adapters.sandbox_child")
    parser.add_argument("path")
    parser.add_argument("--budget-mb", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--opt-level", default="all")
    args = parser.parse_args(argv)

    def answer(obj: dict[str, object]) -> int:
        print(json.dumps(obj), flush=True)
        return 0 if obj.get("ok") else 3

    try:
        data = Path(args.path).read_bytes()
        check_model_bytes(data)
    except EdgefleetError as exc:
        return answer({"ok": False, "reason": exc.reason, "message": str(exc)})
    except OSError as exc:
        return answer({"ok": False, "reason": "model_unreadable", "message": str(exc)})
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = levels.get(args.opt_level, levels["all"])
    opts.log_severity_level = 4
    limit = psutil.Process().memory_info().vms + args.budget_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
    except MemoryError as exc:
        return answer({"ok": False, "reason": "guard_memory", "message": f"out of memory: {exc}"})
    except Exception as exc:  # onnxruntime's own Fail/InvalidGraph/RuntimeException types
        text = str(exc)
        reason = "guard_memory" if "bad_alloc" in text or "alloc" in text.lower() else "model_load"
        return answer({"ok": False, "reason": reason, "message": text[:2000]})
    return answer({"ok": True})


if __name__ == "__main__":
    sys.exit(main())
