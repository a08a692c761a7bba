"""The Slack app manifest for Konstruct: paste it at api.slack.com/apps → Create New App → From a manifest.

An agent app (`features.agent_view`: conversations in the app's Messages tab), with exactly the scopes and
event subscriptions the code uses (konstruct/channels/slack/api.py), and either the gateway's request URLs
or Socket Mode (no public URL: the gateway opens the connection to Slack).
"""

from __future__ import annotations

from typing import Any

from konstruct.channels.slack.api import bot_events, bot_scopes

EVENTS_PATH = "/slack/events"
INTERACTIVE_PATH = "/slack/interactive"
OAUTH_REDIRECT_PATH = "/slack/oauth_redirect"
MAX_AGENT_DESCRIPTION = 300  # Slack's limit for agent_view.agent_description
MAX_NAME = 35  # Slack's limit for an app's name and its bot's display name
MAX_SHORT_DESCRIPTION = 140  # display_information.description


def agent_description(organisation: str | None, agents: list[tuple[str, str]]) -> str:
    """What the app says it does: the organisation's agents and their roles, within Slack's 300 characters."""
    who = f" for {organisation}" if organisation else ""
    if agents:
        roles = "; ".join(f"{name}: {role}" for name, role in agents)
        text = f"Konstruct agents{who}. {roles}"
    else:
        text = f"An AI agent{who}, run by Konstruct: ask it in its Messages tab, mention it in a channel or message it directly."
    return cut(text, MAX_AGENT_DESCRIPTION)


def cut(text: str, limit: int) -> str:
    """At most `limit` characters, an ellipsis where it was cut."""
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def app_manifest(public_url: str, *, name: str, description: str, socket_mode: bool) -> dict[str, Any]:
    """The manifest as a dict (JSON- and YAML-ready), keys in the order Slack's own examples use."""
    base = public_url.rstrip("/")
    name = cut(name, MAX_NAME)
    events: dict[str, Any] = {"bot_events": bot_events()}
    interactivity: dict[str, Any] = {"is_enabled": True}
    oauth: dict[str, Any] = {"scopes": {"bot": bot_scopes()}}
    if not socket_mode:
        events = {"request_url": f"{base}{EVENTS_PATH}", **events}
        interactivity["request_url"] = f"{base}{INTERACTIVE_PATH}"
        oauth = {"redirect_urls": [f"{base}{OAUTH_REDIRECT_PATH}"], **oauth}
    return {
        "display_information": {"name": name, "description": cut(description, MAX_SHORT_DESCRIPTION)},
        "features": {
            "app_home": {"home_tab_enabled": False, "messages_tab_enabled": True, "messages_tab_read_only_enabled": False},
            "bot_user": {"display_name": name, "always_online": True},
            "agent_view": {"agent_description": cut(description, MAX_AGENT_DESCRIPTION)},
        },
        "oauth_config": oauth,
        "settings": {
            "event_subscriptions": events,
            "interactivity": interactivity,
            "org_deploy_enabled": False,
            "socket_mode_enabled": socket_mode,
            "token_rotation_enabled": False,
        },
    }
