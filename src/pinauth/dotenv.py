"""Write a starter `.env` with freshly generated secrets (used by `make run`)."""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

from cryptography.fernet import Fernet

TEMPLATE = """\
# Written by `make run` on first start. Keep this file secret; it is git-ignored.
# Every setting is described in .env.example.
PINAUTH_SECRET_KEY={secret_key}
PINAUTH_ENCRYPTION_KEYS={encryption_key}

# From your app at https://developers.pinterest.com/apps/
# PINTEREST_CLIENT_ID=
# PINTEREST_CLIENT_SECRET=
"""


def write_env(path: Path) -> bool:
    """Create `path` with new keys; never overwrite an existing file."""
    content = TEMPLATE.format(
        secret_key=secrets.token_urlsafe(48), encryption_key=Fernet.generate_key().decode()
    )
    try:
        with path.open("x", encoding="utf-8") as f:
            f.write(content)
    except FileExistsError:
        return False
    path.chmod(0o600)
    return True


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else ".env")
    if write_env(target):
        print(
            f"wrote {target} with freshly generated PINAUTH_SECRET_KEY and PINAUTH_ENCRYPTION_KEYS"
        )
    else:
        print(f"{target} exists; left untouched")
