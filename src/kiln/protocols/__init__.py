"""HTTP adapters: each translates its protocol to and from the internal request type."""
