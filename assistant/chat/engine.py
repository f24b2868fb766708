"""One conversation with the model: turns, one image, the context window, streaming, stop, regenerate, edit.

The terminal app, `lva ask`, `lva batch` and `lva serve` all talk through this. It works with any model that
has the runtime's interface (`load_model` of a pair, or of a plain text GGUF, which then chats without images).

The evaluated transcript is kept as token ids: a new turn appends its own tokens after the previous
prompt and the answer as it was generated, so the KV cache covers everything before it and only the new
turn is evaluated. Re-rendering the text would re-tokenize the answers and could differ from what the
model produced.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Generator, Literal

from assistant.chat.template import IMAGE_TOKEN, ChatTemplate, ChatTemplateError, TemplateMessage, ToolCall
from models.errors import LvaError

DEFAULT_MAX_TOKENS = 1024
Answer = Generator[str, None, None]     # an answer's text pieces as they are sampled; close() it to stop early


class ChatError(LvaError):
    """Something the user can fix: the message is one line."""


class ContextOverflow(ChatError):
    """The prompt and the room asked for the answer do not fit the context (when turns may not be dropped)."""


@dataclass(frozen=True)
class Sampling:
    """Per-conversation settings, llama.cpp's samplers."""

    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    max_tokens: int | None = DEFAULT_MAX_TOKENS     # None: until the end of the turn or a full context
    seed: int | None = None
    stop: tuple[str, ...] = ()                      # the answer ends before the first of these strings
    grammar: str | None = None                      # GBNF the answer must follow (JSON output for the server)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))     # a list when read back from the history's JSON

    def generate_args(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "max_tokens"}


@dataclass
class Turn:
    role: str                                   # user | assistant | tool (a tool's result, from lva serve's clients)
    text: str
    image: Path | bytes | None = None           # the image attached at this user turn (bytes: sent to lva serve)
    status: str = "complete"                    # assistant turns: complete | stopped
    message_id: int | None = None               # its row in the history, when kept
    tool_calls: tuple[ToolCall, ...] = ()       # assistant turns that called tools


@dataclass
class Reply:
    """What one answer cost and what happened around it."""

    text: str = ""
    status: Literal["complete", "stopped"] = "complete"
    done_reason: str = "stop"                   # as Ollama says it: stop (end of turn) | length (max_tokens) | stopped
    prompt_tokens: int = 0                      # the whole prompt
    evaluated_tokens: int = 0                   # of those, what the KV cache did not already hold
    completion_tokens: int = 0
    seconds: float = 0.0
    prompt_seconds: float = 0.0                 # of those, until the first token was sampled (image, prompt)
    dropped_turns: int = 0                      # oldest turns left out to fit the context


@dataclass
class Conversation:
    """The engine's state: what the history stores, plus the token transcript behind the KV cache."""

    system_prompt: str | None = None
    turns: list[Turn] = field(default_factory=list)
    sampling: Sampling = field(default_factory=Sampling)
    transcript: list[int] = field(default_factory=list)   # prompt + answer ids of the last exchange
    transcript_turns: int = 0                             # how many turns `transcript` covers
    last_prompt: list[int] = field(default_factory=list)   # the ids the last answer was generated from
    tools: list[dict] | None = None                       # JSON schemas of the tools the template shows the model
    optional_tools: bool = False                          # left out when they would crowd the answer out (below)

    def take_transcript(self, previous: Conversation) -> None:
        """Continue from `previous` when this conversation repeats it and adds turns, as a stateless client
        (`lva serve`) resends its whole conversation: then only the new turns' tokens are evaluated."""
        done = previous.transcript_turns
        if not done or (self.system_prompt, self.tools) != (previous.system_prompt, previous.tools) \
                or len(self.turns) <= done:
            return
        if all((a.role, a.text, a.image, a.tool_calls) == (b.role, b.text, b.image, b.tool_calls)
               for a, b in zip(self.turns[:done], previous.turns[:done])):
            self.transcript, self.transcript_turns = previous.transcript, done


class ChatEngine:
    """Drives one model through conversations; not thread-safe except `stop()`."""

    def __init__(self, model, clock: Callable[[], float] = time.perf_counter, date_string: str | None = None,
                 decoder=None):
        """`decoder`: where answers are decoded when not by the model alone, one at a time: a ParallelDecoder
        over it (assistant/runtime/parallel.py), which decodes several conversations' answers together."""
        self.model = model
        self.source = decoder if decoder is not None else model
        self.clock = clock
        self.date_string = date_string
        source = model.chat_template
        if not source:
            raise ChatError(f"{model.text_path.name} has no chat template; convert it from an Instruct checkpoint")
        self.template = ChatTemplate(source, model.special_token_text(model.bos_token))
        self.end_of_message = self._end_of_message()
        self._stop = threading.Event()

    def _end_of_message(self) -> str:
        """The text the template puts right after an assistant message (`<|eot_id|>` for Llama 3)."""
        marker = "\x00answer\x00"
        text = self.template.render([TemplateMessage("user", "?"), TemplateMessage("assistant", marker)],
                                    add_generation_prompt=False)
        return text.split(marker, 1)[1] if marker in text else ""

    # ------------------------------------------------------------------------------------------ prompts

    def current_image(self, conversation: Conversation,
                      upto: int | None = None) -> tuple[int | None, Path | bytes | None]:
        """The last image attached before turn `upto`: the model attends to the last image only."""
        for index in range(len(conversation.turns[:upto]) - 1, -1, -1):
            if conversation.turns[index].image is not None:
                return index, conversation.turns[index].image
        return None, None

    def _messages(self, conversation: Conversation, turns: list[Turn], image_turn: int | None) -> list[TemplateMessage]:
        messages = [TemplateMessage("system", conversation.system_prompt)] if conversation.system_prompt else []
        return messages + [TemplateMessage(t.role, t.text, has_image=(i == image_turn), tool_calls=t.tool_calls)
                           for i, t in enumerate(turns)]

    def _render(self, conversation: Conversation, turns: list[Turn], image_turn: int | None) -> list[int]:
        text = self._text(conversation, turns, image_turn, add_generation_prompt=True)
        if image_turn is not None and IMAGE_TOKEN not in text:
            raise ChatError("this model's chat template has no place for an image (is it a vision model?)")
        return self.model.tokenize(text)

    def prompt(self, conversation: Conversation,
               drop_turns: bool = True) -> tuple[list[int], Path | bytes | None, int]:
        """Token ids for the next answer, the image they bind, and how many old turns were dropped to fit.

        Oldest turns go first, in user/assistant pairs; the system prompt and the image's turn stay. With
        `drop_turns` False a prompt that leaves no room for an answer raises `ContextOverflow` instead, and
        one that leaves less than max_tokens is kept: its answer ends when the context is full.
        `optional_tools` go first of all, when the prompt with them leaves less room than max_tokens (a quarter
        of the context without a limit): a client's dozens of tools can take more than a small context.
        """
        turns = list(conversation.turns)
        image_turn, image = self.current_image(conversation)
        dropped = 0
        ids = self._incremental(conversation, image_turn)
        if ids is None:
            ids = self._render(conversation, turns, image_turn)
        room = conversation.sampling.max_tokens or self.model.n_ctx // 4
        if conversation.optional_tools and conversation.tools and len(ids) + room > self.model.n_ctx:
            conversation.tools = None
            ids = self._render(conversation, turns, image_turn)
        if not drop_turns:
            self._check_fits(ids)
            return ids, image, dropped
        while len(ids) > self.model.n_ctx - (conversation.sampling.max_tokens or 0):
            victim = next((i for i in range(len(turns) - 1) if i != image_turn and turns[i].role == "user"), None)
            if victim is None:
                raise ChatError(f"the message is too long: {len(ids)} tokens, and the context holds "
                                f"{self.model.n_ctx} with {conversation.sampling.max_tokens} kept for the answer")
            count = 2 if victim + 1 < len(turns) - 1 and turns[victim + 1].role == "assistant" else 1
            del turns[victim:victim + count]
            if image_turn is not None and image_turn > victim:
                image_turn -= count
            dropped += count
            ids = self._render(conversation, turns, image_turn)
        return ids, image, dropped

    def _check_fits(self, ids: list[int]) -> None:
        if len(ids) >= self.model.n_ctx:
            raise ContextOverflow(f"the prompt has {len(ids)} tokens and the context holds {self.model.n_ctx}, "
                                  "with no room left for an answer")

    def _incremental(self, conversation: Conversation, image_turn: int | None) -> list[int] | None:
        """The kept transcript + the new turns' tokens, when the template renders the new turns as a suffix."""
        done = conversation.transcript_turns
        if not conversation.transcript or done >= len(conversation.turns):
            return None
        if image_turn is not None and image_turn >= done:
            return None                                      # a new image changes how the template starts
        before = self._text(conversation, conversation.turns[:done], image_turn, add_generation_prompt=False)
        after = self._text(conversation, conversation.turns, image_turn, add_generation_prompt=True)
        if not after.startswith(before):
            return None
        return conversation.transcript + self.model.tokenize(after[len(before):])

    def _text(self, conversation: Conversation, turns: list[Turn], image_turn: int | None,
              add_generation_prompt: bool) -> str:
        variables: dict[str, Any] = {"date_string": self.date_string} if self.date_string else {}
        try:
            return self.template.render(self._messages(conversation, turns, image_turn),
                                        add_generation_prompt=add_generation_prompt, tools=conversation.tools,
                                        **variables)
        except ChatTemplateError as exc:
            raise ChatError(str(exc)) from None

    # ------------------------------------------------------------------------------------------ answers

    def send(self, conversation: Conversation, text: str, image: Path | None = None,
             on_reply: Callable[[Reply], None] | None = None) -> Answer:
        """Add a user turn and stream the answer; the finished `Reply` goes to `on_reply`."""
        if image is not None and getattr(self.model, "vision", None) is None:
            raise ChatError(f"{self.model.text_path.name} has no vision file, so it cannot look at images")
        conversation.turns.append(Turn("user", text, image=Path(image) if image else None))
        return self._answer(conversation, on_reply)

    def regenerate(self, conversation: Conversation, on_reply: Callable[[Reply], None] | None = None) -> Answer:
        """Drop the last answer and answer the last user turn again."""
        if conversation.turns and conversation.turns[-1].role == "assistant":
            conversation.turns.pop()
        if not conversation.turns:
            raise ChatError("there is nothing to answer yet")
        # The same ids as last time (re-rendering would re-tokenize earlier answers' text).
        prompt = conversation.last_prompt or None
        conversation.transcript, conversation.transcript_turns = [], 0
        return self._answer(conversation, on_reply, prompt)

    def edit(self, conversation: Conversation, index: int, text: str,
             on_reply: Callable[[Reply], None] | None = None) -> Answer:
        """Replace user turn `index`, forget everything after it, and answer from there."""
        if not 0 <= index < len(conversation.turns) or conversation.turns[index].role != "user":
            raise ChatError(f"turn {index + 1} is not a message of yours")
        conversation.turns[index] = replace(conversation.turns[index], text=text, message_id=None)
        del conversation.turns[index + 1:]
        conversation.transcript, conversation.transcript_turns = [], 0
        return self._answer(conversation, on_reply)

    def answer(self, conversation: Conversation, on_reply: Callable[[Reply], None] | None = None) -> Answer:
        """Answer a conversation whose last turn is the user's (or a tool's result), as it stands: a conversation
        that does not fit the context is refused (`ContextOverflow`), not shortened, and the answer ends at
        max_tokens or when the context is full. For clients that send whole conversations (`lva serve`)."""
        if not conversation.turns or conversation.turns[-1].role not in ("user", "tool", "ipython"):
            raise ChatError("the last message must be the user's or a tool's result")
        if self.current_image(conversation)[1] is not None and getattr(self.model, "vision", None) is None:
            raise ChatError(f"{self.model.text_path.name} has no vision file, so it cannot look at images")
        return self._answer(conversation, on_reply, drop_turns=False)

    def complete(self, text: str, image: Path | bytes | None, sampling: Sampling,
                 on_reply: Callable[[Reply], None] | None = None) -> Answer:
        """Continue a raw prompt, no chat template (Ollama's `raw`); `<|image|>` in `text` binds the image."""
        ids = self.model.tokenize(text)
        if not ids:
            raise ChatError("the prompt is empty")
        self._check_fits(ids)
        reply = Reply(prompt_tokens=len(ids))
        return self._generate(ids, image, sampling, reply, [], on_reply)

    def stop(self) -> None:
        """Ask a running answer to end after the current token; the partial answer is kept, marked stopped."""
        self._stop.set()

    def _answer(self, conversation: Conversation, on_reply: Callable[[Reply], None] | None,
                prompt: list[int] | None = None, drop_turns: bool = True) -> Answer:
        ids, image, dropped = self.prompt(conversation, drop_turns)
        if prompt is not None:
            ids, dropped = prompt, 0
        conversation.last_prompt = ids
        reply = Reply(prompt_tokens=len(ids), dropped_turns=dropped)
        answer = Turn("assistant", "", status="stopped")        # kept as stopped unless it ends by itself
        conversation.turns.append(answer)
        tokens: list[int] = []

        def close(reply: Reply) -> None:
            answer.status = reply.status
            # What the template writes after an answer closes it, however the answer ended.
            conversation.transcript = ids + tokens + self.model.tokenize(self.end_of_message)
            # A stop string hides tokens the model did write: then the text is not what the transcript says.
            exact = self._text_of(tokens) == reply.text
            conversation.transcript_turns = len(conversation.turns) if dropped == 0 and exact else 0
            if on_reply:
                on_reply(reply)

        for piece in self._generate(ids, image, conversation.sampling, reply, tokens, close):
            answer.text += piece
            yield piece

    def _generate(self, ids: list[int], image: Path | bytes | None, sampling: Sampling, reply: Reply,
                  tokens: list[int], on_reply: Callable[[Reply], None] | None) -> Answer:
        """Stream the answer to `ids`, keeping its ids in `tokens`; `reply` is complete when `on_reply` sees
        it, also when the caller stops early or closes the iterator."""
        self._stop.clear()
        start = self.clock()
        max_tokens = sampling.max_tokens if sampling.max_tokens is not None else self.model.n_ctx

        def keep(token: int) -> None:
            if not tokens:
                reply.prompt_seconds = self.clock() - start
            tokens.append(token)

        def evaluated(count: int) -> None:
            reply.evaluated_tokens = count

        ended = False                                   # by itself, not stopped
        stream = self.source.generate(ids, image=image, max_tokens=max_tokens, on_token=keep, on_evaluated=evaluated,
                                      **sampling.generate_args())
        try:
            for piece in stream:
                reply.text += piece
                yield piece
                if self._stop.is_set():
                    break
            else:
                ended = True
        finally:
            stream.close()                              # its own end first: it reports what was evaluated
            if not ended:
                reply.status, reply.done_reason = "stopped", "stopped"
            elif len(tokens) >= max_tokens or len(ids) + len(tokens) >= self.model.n_ctx:
                reply.done_reason = "length"
            reply.completion_tokens, reply.seconds = len(tokens), self.clock() - start
            if not tokens:
                reply.prompt_seconds = reply.seconds
            if on_reply:
                on_reply(reply)

    def _text_of(self, tokens: list[int]) -> str:
        return b"".join(self.model.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")
