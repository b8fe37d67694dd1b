"""`kiln build`: a project as a reproducible OCI image, written without a container
daemon (docs/architecture.md, "Images")."""
