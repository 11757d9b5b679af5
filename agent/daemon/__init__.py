"""The device shell around the pure stages: the service that wires every part (`service`),
systemd notify (`sdnotify`), signals and the control socket (`control`), the clock, state
directory health, logs and `doctor`."""
