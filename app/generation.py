"""The generation requests: what the web app posts to a worker's inference server (`/generate`
for a chat, `/complete` for a raw prompt, OpenAI's legacy completions).

One model for both ends: the web app builds it (app/services/inference_client.py,
app/services/completions.py) and the inference server validates the body with it
(worker/inference.py). Only pydantic here: the GPU machine imports it without the web stack.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_NEW_TOKENS = 4096
MAX_STOP_STRINGS = 8
MAX_LOGPROBS = 5
"""The most alternatives a completion's `logprobs` lists per token (OpenAI's legacy limit)."""
MAX_PROMPT_TOKEN_ID = 2**31 - 1


class ChatMessage(BaseModel):
    """One message as chat templates take it; with tools, an assistant's `tool_calls`
    (`{"type": "function", "function": {"name", "arguments": {...}}}`) and a `tool` result."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    @field_validator("role", mode="before")
    @classmethod
    def _developer_is_system(cls, value: Any) -> Any:
        """OpenAI's newer name for the system message; chat templates know only `system`."""
        return "system" if value == "developer" else value

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


def _stop_strings(value: Any) -> Any:
    if value is None:
        return []
    return [value] if isinstance(value, str) else value


def _non_empty_stops(value: list[str]) -> list[str]:
    if not all(value):
        raise ValueError("Stop strings must not be empty")
    return value[:MAX_STOP_STRINGS]


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
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    """Makes sampling repeatable; greedy decoding needs none."""

    _one_or_many = field_validator("stop", mode="before")(_stop_strings)
    _non_empty = field_validator("stop")(_non_empty_stops)

    def chat(self) -> list[dict[str, Any]]:
        """The messages as a chat template takes them (fields a message does not have left out)."""
        return [m.model_dump(exclude_none=True) for m in self.messages]


class CompletionRequest(BaseModel):
    """One raw-prompt completion (OpenAI's legacy /v1/completions, one prompt): the prompt as
    text or token ids, continued with no chat template; optionally echoed and scored."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    model: str = Field(min_length=1)
    """A base model's name or an adapter's id."""
    prompt: str | list[Annotated[int, Field(ge=0, le=MAX_PROMPT_TOKEN_ID)]] = Field(min_length=1)
    """Text (tokenised as the model's tokenizer does by default) or token ids, as given."""
    max_new_tokens: int = Field(default=16, ge=0, le=MAX_NEW_TOKENS)
    """0 with `echo`: only the prompt comes back (scored when `logprobs` is set)."""
    temperature: float = Field(default=1.0, ge=0, le=2)
    """0 decodes greedily."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: list[str] = []
    """Strings that end the answer (not included in it); the first MAX_STOP_STRINGS count."""
    echo: bool = False
    """Send the prompt's tokens back before the answer's."""
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    """Each token's log-probability and this many most likely alternatives; None: neither."""
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    """Makes sampling repeatable; greedy decoding needs none."""

    _one_or_many = field_validator("stop", mode="before")(_stop_strings)
    _non_empty = field_validator("stop")(_non_empty_stops)
