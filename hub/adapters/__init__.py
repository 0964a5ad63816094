"""The hub's adapters: the admin HTTP API, the MQTT ingest link, brokers and their config, PKI
and TLS, the admin API client, ONNX/skl2onnx on the publisher, the home folder, shipped files."""
