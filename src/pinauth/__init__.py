"""pinauth: connect users' Pinterest accounts and call the Pinterest API v5 for them."""

__version__ = "0.1.0"
