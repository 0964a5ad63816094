"""The hub's services, each built from narrow ports (database, publisher, signer, clock) rather
than the Hub object: rollouts, drift monitoring, enrolment, keys, metrics, device groups."""
