"""The agent application: the updater that executes the core's plans, serving, the daemon that
wires everything together, the command line and the simulated fleet."""
