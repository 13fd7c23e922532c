"""Untrusted JSON documents (manifests, indexes, image configs, index.json): parsed, or a
FormatError that names the document."""
from __future__ import annotations

import json
from typing import Any

from .errors import FormatError


def parse_json(data: bytes | str, what: str) -> Any:
    """The document `data` holds; `what` names it in errors ("REF: manifest")."""
    try:
        return json.loads(data)
    except ValueError as exc:  # UnicodeDecodeError included
        raise FormatError(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        # json's decoder recurses once per nesting level: "[[[[..." would escape as a traceback.
        raise FormatError(f"{what} is nested too deeply to be JSON crfs reads") from None


def json_object(data: bytes | str, what: str) -> dict[str, Any]:
    """A document that must be a JSON object (every OCI/Docker manifest, index and config)."""
    document = parse_json(data, what)
    if not isinstance(document, dict):
        raise FormatError(f"{what} is not a JSON object")
    return document
