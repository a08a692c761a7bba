"""The app's Messages tab opened (`app_home_opened`, tab "messages"): offer the agent's suggested prompts.

Done by the gateway, after the event is acknowledged: nothing is stored (there is no message to answer, and a
missed event only means the prompts of the last opening stay), so it does not go through the inbox. The Web API
call runs as a background task, bounded in time (SECONDS) and in number (MAX_IN_FLIGHT: beyond that an opening is
skipped, never queued), and its failures are logged, never raised: the ack never waits for it.

Which agent: the one a new thread there would go to, as for a first message in it (the DM channel's route, else
the connection's default agent, else the tenant's first agent).
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from slack_sdk.errors import SlackApiError
from sqlalchemy import func, select

from konstruct.channels.slack.client import web_client
from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.db.models import Agent, ChannelConnection, ChannelRoute

log = logging.getLogger("konstruct.slack")

SECONDS = 5.0  # the most one opening may take, look-up and Web API call together
MAX_IN_FLIGHT = 64
MAX_PROMPT_TITLE = 75  # characters of a prompt's title (the button); clicking it sends the whole prompt


def prompt_entries(prompts: list[str]) -> list[dict[str, str]]:
    """Slack's prompt objects: a short title to click, the whole prompt as the message it sends."""
    entries = []
    for prompt in prompts:
        line = " ".join(prompt.split())
        title = line if len(line) <= MAX_PROMPT_TITLE else line[: MAX_PROMPT_TITLE - 1].rstrip() + "…"
        entries.append({"title": title, "message": prompt})
    return entries


async def agent_prompts(db: Database, tenant_id: uuid.UUID, connection_id: uuid.UUID, channel: str) -> list[str]:
    """The suggested prompts of the agent a new thread in DM `channel` goes to (none when the tenant has no agent)."""
    async with db.tenant(tenant_id=tenant_id) as session:
        routed = (
            select(ChannelRoute.agent_id)
            .where(ChannelRoute.connection_id == connection_id, ChannelRoute.external_channel == channel)
            .scalar_subquery()
        )
        default = select(ChannelConnection.default_agent_id).where(ChannelConnection.id == connection_id).scalar_subquery()
        first = select(Agent.id).order_by(Agent.created_at, Agent.id).limit(1).scalar_subquery()
        prompts = await session.scalar(select(Agent.suggested_prompts).where(Agent.id == func.coalesce(routed, default, first)))
    return list(prompts or [])


class MessagesTab:
    """Sets suggested prompts when a person opens the app's Messages tab (see the module docstring)."""

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self._tasks: set[asyncio.Task[None]] = set()

    def opened(self, *, tenant_id: uuid.UUID, connection_id: uuid.UUID, team_id: str, channel: str, token: str) -> bool:
        """Start setting the prompts in the background; False when too many openings are in flight already."""
        if len(self._tasks) >= MAX_IN_FLIGHT:
            log.warning("skipping suggested prompts for %s: %d openings in flight", team_id, len(self._tasks))
            return False
        task = asyncio.create_task(self._bounded(tenant_id, connection_id, team_id, channel, token))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _bounded(self, tenant_id: uuid.UUID, connection_id: uuid.UUID, team_id: str, channel: str, token: str) -> None:
        try:
            await asyncio.wait_for(self._set(tenant_id, connection_id, team_id, channel, token), SECONDS)
        except TimeoutError:
            log.warning("suggested prompts for %s took longer than %.0f s: given up", team_id, SECONDS)
        except SlackApiError as exc:
            log.warning("Slack refused the suggested prompts for %s: %s", team_id, exc.response.get("error"))
        except Exception as exc:  # the prompts are a nicety: never an error anywhere else
            log.warning("could not set suggested prompts for %s: %s", team_id, type(exc).__name__)

    async def _set(self, tenant_id: uuid.UUID, connection_id: uuid.UUID, team_id: str, channel: str, token: str) -> None:
        prompts = await agent_prompts(self.db, tenant_id, connection_id, channel)
        if not prompts:
            return
        # No thread_ts: for an agent_view app Slack sets them for the Messages tab (with one, the call silently fails).
        await web_client(self.settings, token).assistant_threads_setSuggestedPrompts(channel_id=channel, prompts=prompt_entries(prompts))
