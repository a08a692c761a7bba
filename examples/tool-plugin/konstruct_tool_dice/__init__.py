"""roll_dice: an example Konstruct tool plugin, found through the ``konstruct.tools`` entry-point group."""

from __future__ import annotations

import random
from typing import Any

from konstruct.agent.tools import Tool, ToolContext

_random = random.SystemRandom()


async def roll(args: dict[str, Any], ctx: ToolContext) -> str:
    """Roll ``count`` dice with ``sides`` sides each (the registry has already checked the bounds)."""
    sides, count = int(args["sides"]), int(args.get("count", 1))
    rolls = [_random.randint(1, sides) for _ in range(count)]
    return f"Rolled {count}d{sides}: {', '.join(map(str, rolls))} (total {sum(rolls)})"


tool = Tool(
    name="roll_dice",
    description="Roll fair dice (from the operating system's random source) and report each roll and the total.",
    parameters={
        "type": "object",
        "properties": {
            "sides": {"type": "integer", "minimum": 2, "maximum": 1000, "description": "sides per die, e.g. 6 or 20"},
            "count": {"type": "integer", "minimum": 1, "maximum": 100, "description": "how many dice (default 1)"},
        },
        "required": ["sides"],
        "additionalProperties": False,
    },
    run=roll,
)
