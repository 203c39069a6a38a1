"""Structured logging: one line per event, an event name and key=value fields.

The server's formatter writes ``fields`` as key=value pairs or JSON (``--log-format``); every
module logs through these two functions so that each line has the same shape.
"""

from __future__ import annotations

import logging


def event(logger: logging.Logger, level: int, name: str, /, **fields: object) -> None:
    """Log the event ``name`` with its fields."""
    logger.log(level, name, extra={"fields": fields})


def exception(logger: logging.Logger, name: str, /, **fields: object) -> None:
    """Log the event ``name`` with its fields and the exception being handled."""
    logger.exception(name, extra={"fields": fields})
