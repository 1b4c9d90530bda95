"""The generation request: what the web app posts to a worker's inference server (`/generate`).

One model for both ends: the web app builds it (app/services/inference_client.py) and the
inference server validates the body with it (worker/inference.py). Only pydantic here: the GPU
machine imports it without the web stack.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_NEW_TOKENS = 4096
MAX_STOP_STRINGS = 8


class ChatMessage(BaseModel):
    """One message as chat templates take it; with tools, an assistant's `tool_calls`
    (`{"type": "function", "function": {"name", "arguments": {...}}}`) and a `tool` result."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value: Any) -> Any:
        """OpenAI's typed parts (`[{"type": "text", "text": ...}]`): keep the text ones; no
        content (an assistant message that only calls tools) is ""."""
        if value is None:
            return ""
        if isinstance(value, list):
            return "".join(
                p.get("text", "") for p in value if isinstance(p, dict) and p.get("type") == "text"
            )
        return value


class GenerationRequest(BaseModel):
    """One chat generation: a base model or an adapter, the conversation, the sampling settings."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    model: str = Field(min_length=1)
    """A base model's name or an adapter's id."""
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float = Field(default=0.7, ge=0, le=2)
    """0 decodes greedily."""
    top_p: float = Field(default=0.95, gt=0, le=1)
    max_new_tokens: int = Field(default=256, ge=1, le=MAX_NEW_TOKENS)
    stop: list[str] = []
    """Strings that end the answer (not included in it); the first MAX_STOP_STRINGS count."""
    tools: list[dict[str, Any]] | None = None
    """OpenAI's tool definitions, rendered by the model's chat template (`tools=`)."""

    @field_validator("stop", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        if value is None:
            return []
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _non_empty(cls, value: list[str]) -> list[str]:
        if not all(value):
            raise ValueError("stop strings must not be empty")
        return value[:MAX_STOP_STRINGS]

    def chat(self) -> list[dict[str, Any]]:
        """The messages as a chat template takes them (fields a message does not have left out)."""
        return [m.model_dump(exclude_none=True) for m in self.messages]
