"""Konstruct: self-hosted AI employees for Slack, WhatsApp and the terminal."""

__version__ = "0.1.0"
