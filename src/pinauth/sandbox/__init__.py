"""A local Pinterest API v5: `pinauth sandbox`, or mounted at /sandbox by `serve --demo`."""

from pinauth.sandbox.app import create_sandbox_app
from pinauth.sandbox.state import SandboxConfig

__all__ = ["SandboxConfig", "create_sandbox_app"]
