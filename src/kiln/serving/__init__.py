"""The data plane core: worker processes, the IPC between them and the server, routing."""
