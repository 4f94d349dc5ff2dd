"""The official Pinterest SDK, unchanged, as a backend would run it through pinauth.

Run by tests/test_sdk.py in a process of its own: the SDK reads its configuration from
the environment when `pinterest` is imported (PINTEREST_API_URI, PINTEREST_ACCESS_TOKEN),
so the only change from talking to Pinterest is that environment. Prints what it did
as one JSON object.
"""

from __future__ import annotations

import json
import sys

from pinterest.organic.boards import Board  # type: ignore[import-untyped]
from pinterest.organic.pins import Pin  # type: ignore[import-untyped]


def main() -> None:
    before, _ = Board.get_all()
    board = Board.create(name="Through pinauth", description="made by the official SDK")
    pin = Pin.create(
        board_id=board.id,
        media_source={"source_type": "image_url", "url": "https://i.pinimg.com/sdk.jpg"},
        title="An SDK pin",
    )
    after, _ = Board.get_all()
    json.dump(
        {
            "boards_before": [b.id for b in before],
            "board": {"id": board.id, "name": board.name},
            "pin": {"id": pin.id, "board_id": pin.board_id, "title": pin.title},
            "boards_after": [b.id for b in after],
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main()
