"""The control plane: running the server, its state, logs."""
