"""Errors every layer can raise or catch; this module imports nothing of radixflow's."""

from __future__ import annotations

# How a disaggregated decode server's request ends when its KV never arrived (the prefill server died, refused or
# stalled): the server answers 503 with this message, and the router retries the request on another pair.
KV_TRANSFER_FAILED = "KV transfer failed"


class InvalidRequestError(ValueError):
    """A request the engine refuses; `field` names the offending parameter (as the caller spelled it)."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.detail = message

    def renamed(self, names: dict[str, str]) -> InvalidRequestError:
        """The same error in an API whose field names differ (`max_new_tokens` is `max_tokens` in OpenAI's)."""
        field = names.get(self.field, self.field)
        detail = self.detail
        for runtime_name, api_name in names.items():
            detail = detail.replace(runtime_name, api_name)
        return InvalidRequestError(field, detail)
