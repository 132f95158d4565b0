"""`rlx serve` (an OpenAI-compatible HTTP server) and `rlx chat` (a terminal chat) on the batched engine.

Layer: above `rlx.api` (which loads a model and hands out its engine), below `rlx.cli`. The modules
that need no model (protocol, chat_template, text, structured, metrics) are tested on their own.
"""
