"""The daemon: configuration, deployment, control socket, signals and systemd integration."""
