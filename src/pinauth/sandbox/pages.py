"""The sandbox's HTML pages (the consent page and its errors) and their Content-Security-Policy."""

from __future__ import annotations

import base64
import hashlib
import html
from collections.abc import Iterable
from urllib.parse import urlsplit

from fastapi.responses import HTMLResponse

_STYLE = """
  body { font: 16px/1.5 system-ui, sans-serif; background: #f3f3f3; color: #111;
         display: grid; place-items: center; min-height: 100vh; margin: 0; }
  main { background: #fff; border-radius: 16px; padding: 2rem 2.5rem; max-width: 28rem;
         box-shadow: 0 4px 24px rgba(0,0,0,.08); }
  h1 { margin-top: 0; font-size: 1.4rem; } .badge { color: #e60023; font-weight: 700; }
  button { font: inherit; font-weight: 600; border: 0; border-radius: 24px;
           padding: .6rem 1.4rem; cursor: pointer; margin-right: .5rem; }
  .allow { background: #e60023; color: #fff; } .deny { background: #e9e9e9; }
  .note { color: #767676; font-size: .85rem; margin-top: 1.5rem; }
  code { background: #f0f0f0; padding: 0 .3rem; border-radius: 4px; }
  fieldset { border: 0; padding: 0; margin: 0 0 1.2rem; } label { display: block; }
"""
_STYLE_HASH = base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()


def page_policy(redirect_uris: Iterable[str]) -> str:
    """No script at all; the one inline style by hash; the consent form posts to the page
    itself, which redirects to a registered redirect URI (form-action covers redirects)."""
    targets: set[str] = set()
    for uri in redirect_uris:
        parts = urlsplit(uri)
        if parts.scheme in ("http", "https"):
            targets.add(f"{parts.scheme}://{parts.netloc}")
        else:
            targets.add(f"{parts.scheme}:")
    return (
        f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; "
        f"form-action 'self' {' '.join(sorted(targets))}; "
        "base-uri 'none'; frame-ancestors 'none'"
    )


def html_page(title: str, body: str, *, policy: str, status_code: int = 200) -> HTMLResponse:
    """A sandbox page; `body` is HTML the caller has escaped."""
    document = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)} · pinauth sandbox</title>
<style>{_STYLE}</style></head>
<body><main><p class="badge">Pinterest sandbox</p><h1>{html.escape(title)}</h1>{body}</main>
</body></html>"""
    return HTMLResponse(
        document, status_code=status_code, headers={"Content-Security-Policy": policy}
    )
