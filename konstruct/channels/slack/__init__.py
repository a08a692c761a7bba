"""Slack: events in through the gateway (slack-bolt), replies out from the worker (slack_sdk)."""
