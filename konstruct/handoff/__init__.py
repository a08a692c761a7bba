"""Human handoff (issue 17): a desk thread per escalation where humans see the conversation and answer the person.

`state` keeps who has a handoff and how it ended; `desk` draws the thread and mirrors the person's messages into it;
`replies` carries a human's answer from the inbox to the person's channel; `sweep` is the worker's periodic check
(reminders, statuses, cards to redraw). It sits below both the agent and the channels, and talks to channels only
through konstruct.messaging (`Channel`, `Desk`).
"""
