"""The internal type every record becomes: a `Conversation` of `Message`s (with their `ToolCall`s), or plain text.

`llmft.data.records` builds these from the supported record formats; `llmft.data.render` turns them into token ids
and labels; `Conversation.to_record` writes one back in the canonical OpenAI-style shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SYSTEM, USER, ASSISTANT, TOOL = "system", "user", "assistant", "tool"


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict = field(default_factory=dict)  # the parsed JSON object
    id: str | None = None

    def as_dict(self) -> dict:
        """OpenAI's shape, arguments as an object (Qwen2.5's and Llama 3's templates serialise it themselves)."""
        call = {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        if self.id is not None:
            call["id"] = self.id
        return call


@dataclass(frozen=True)
class Message:
    role: str  # one of SYSTEM, USER, ASSISTANT, TOOL
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # assistant only
    reasoning: str | None = None  # assistant only: its reasoning_content
    train: bool | None = None  # assistant only: the message's own say; None leaves it to --train_turns
    name: str | None = None  # tool results: the function that produced it, when the data says
    tool_call_id: str | None = None  # tool results: the call it answers, when the data says

    def as_dict(self) -> dict:
        """The message as chat templates read it (OpenAI's keys); `train` is llmft's business, not the template's."""
        message = {"role": self.role, "content": self.content}
        if self.reasoning is not None:
            message["reasoning_content"] = self.reasoning
        if self.tool_calls:
            message["tool_calls"] = [call.as_dict() for call in self.tool_calls]
        if self.name is not None:
            message["name"] = self.name
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


@dataclass(frozen=True)
class Conversation:
    """One record.

    A chat record has `messages`: an optional system message, then user turns each answered by the assistant, where
    an assistant turn that calls tools is followed by the tools' results and then the assistant again; it holds at
    least one assistant message. `tools` are the function schemas the model is shown, in OpenAI's shape
    (`{"type": "function", "function": {...}}`), empty when none are given. A plain-text record has `text` only.
    """

    id: str
    messages: tuple[Message, ...] = ()
    text: str | None = None
    tools: tuple[dict, ...] = ()

    @property
    def is_plain_text(self) -> bool:
        return self.text is not None

    def as_dicts(self, default_system: str | None = None) -> list[dict]:
        """Messages as `apply_chat_template` takes them; `default_system` fills in a missing system message."""
        dicts = [m.as_dict() for m in self.messages]
        if default_system and (not dicts or dicts[0]["role"] != SYSTEM):
            dicts.insert(0, {"role": SYSTEM, "content": default_system})
        return dicts

    def to_record(self) -> dict:
        """The canonical OpenAI-style record; `llmft.data.records.parse_record` reads it back to an equal
        Conversation."""
        if self.is_plain_text:
            return {"id": self.id, "text": self.text}
        messages = []
        for m in self.messages:
            message = m.as_dict()
            if m.train is not None:
                message["train"] = m.train
            messages.append(message)
        record = {"id": self.id, "messages": messages}
        if self.tools:
            record["tools"] = list(self.tools)
        return record


def tool_names(tools: tuple[dict, ...]) -> list[str]:
    return [tool["function"]["name"] for tool in tools]
