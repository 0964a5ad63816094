"""The agent's pure core: trust decisions, the update state machine, canary statistics and
telemetry folding. No sockets, threads, clock or files: inputs in, decisions out."""
