"""The hub's pure core: desired states and keyrings, the rollout state machine and its gate,
drift statistics, model lineage. No sockets, threads, clock or database."""
