"""What of Slack this app uses: the events it listens to and the Web API methods it calls, with the scopes each needs.

The one place this is written down: the bolt listeners (`events.py`), the scopes an OAuth install asks for
(`oauth.py`) and the app manifest (`manifest.py`) all read it, and tests/test_slack_manifest.py checks it
against the listeners registered and the Web API calls in the code.
"""

from __future__ import annotations

# Event types the bolt app has a listener for → the subscriptions (manifest `bot_events`) that deliver them.
# `message` arrives through one subscription per kind of conversation.
EVENT_SUBSCRIPTIONS: dict[str, tuple[str, ...]] = {
    "app_mention": ("app_mention",),
    "message": ("message.channels", "message.groups", "message.im", "message.mpim"),
    "app_home_opened": ("app_home_opened",),  # the Messages tab opened: its suggested prompts are set
    "app_uninstalled": ("app_uninstalled",),
    "tokens_revoked": ("tokens_revoked",),
}

# The bot scope each subscription needs (Slack refuses a manifest that subscribes to an event without it).
SUBSCRIPTION_SCOPES: dict[str, tuple[str, ...]] = {
    "app_mention": ("app_mentions:read",),
    "message.channels": ("channels:history",),
    "message.groups": ("groups:history",),
    "message.im": ("im:history",),
    "message.mpim": ("mpim:history",),
    "app_home_opened": (),
    "app_uninstalled": (),
    "tokens_revoked": (),
}

_HISTORY = ("channels:history", "groups:history", "im:history", "mpim:history")

# Web API methods the code calls → the bot scopes they need (a method that works in every kind of
# conversation needs the scope of each kind).
METHOD_SCOPES: dict[str, tuple[str, ...]] = {
    "auth.test": (),
    "oauth.v2.access": (),  # client id and secret, no token
    "apps.connections.open": (),  # the app-level token (APP_TOKEN_SCOPES), not the bot token
    "chat.postMessage": ("chat:write",),
    "chat.update": ("chat:write",),
    "chat.delete": ("chat:write",),  # the app's own placeholder, once the streamed answer shows
    "chat.startStream": ("chat:write",),
    "chat.appendStream": ("chat:write",),
    "chat.stopStream": ("chat:write",),
    "conversations.replies": _HISTORY,  # a retry's look-up: the placeholder, or a stream an attempt left unrecorded
    "conversations.history": _HISTORY,
    # Agent threads (the app's Messages tab). setStatus takes chat:write (Slack's reference; it still accepts
    # assistant:write for now); setSuggestedPrompts and setTitle take assistant:write.
    "assistant.threads.setStatus": ("chat:write",),
    "assistant.threads.setSuggestedPrompts": ("assistant:write",),
    "assistant.threads.setTitle": ("assistant:write",),
    # Who clicked Approve on a tool call for operators: their email, matched to the tenant's users.
    "users.info": ("users:read", "users:read.email"),
    # The human desk: the hand-back modal (a trigger id, no scope), a person's image re-uploaded into the desk thread.
    "views.open": (),
    "files.getUploadURLExternal": ("files:write",),
    "files.completeUploadExternal": ("files:write",),
}

# Downloading a message's files (`url_private`) with the bot token.
FILE_SCOPES: tuple[str, ...] = ("files:read",)

# What the app-level token (xapp-…) of a Socket Mode app must be given when it is created.
APP_TOKEN_SCOPES: tuple[str, ...] = ("connections:write",)


def bot_events() -> list[str]:
    """Every event subscription the app needs, sorted."""
    return sorted({s for subscriptions in EVENT_SUBSCRIPTIONS.values() for s in subscriptions})


def bot_scopes() -> list[str]:
    """Every bot scope the app needs: for its subscriptions, the methods it calls and file downloads, sorted."""
    needed = {scope for subscription in bot_events() for scope in SUBSCRIPTION_SCOPES[subscription]}
    needed.update(scope for scopes in METHOD_SCOPES.values() for scope in scopes)
    needed.update(FILE_SCOPES)
    return sorted(needed)
