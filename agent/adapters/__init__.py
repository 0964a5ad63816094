"""The agent's adapters to the outside: MQTT, HTTP downloads and serving, the disk, ONNX model
checks in a child process, /proc readings, systemd notification, data capture."""
