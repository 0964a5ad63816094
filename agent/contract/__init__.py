"""The wire contract hub and agent share: errors, topics and messages, signed envelopes, the
agent's configuration format. Pure and small; the only part of the agent the hub imports for
its own messages."""
