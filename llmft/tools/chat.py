"""Chat with any result of a run: a base model, an adapter folder, a merged model or a GPTQ checkpoint.

    llmft chat --model_name_or_path output/lora                          # interactive; /reset, /exit or Ctrl-D
    llmft chat --model_name_or_path output/merged-gptq --system "You are a pirate." --temperature 0.9
    llmft chat --model_name_or_path output/merged --prompt "What is LoRA?" --temperature 0   # one reply, for scripts
    llmft chat --model_name_or_path /models/custom --trust_remote_code True   # a model that ships its own code
    llmft chat --model_name_or_path output/lora --tools tools.json --prompt "Weather in Paris?" --temperature 0
    python tools/chat.py --model_name_or_path output/lora                # the same as llmft chat

Interactive mode streams the reply as it is generated and keeps the conversation: each turn is answered with the
whole history, rendered by the model's chat template (ChatML when it has none). `/reset` starts over (the system
prompt stays), `/exit` or end of input quits. With `--prompt` only the reply is printed on stdout; loading messages
go to stderr. Generation stops at the end-of-turn token (`<|im_end|>` for ChatML) or EOS. `--temperature 0` decodes
greedily, so the same prompt always gets the same reply. A model that ships its own Python code (`auto_map` in its
config) is refused unless `--trust_remote_code True`.

`--tools FILE` shows the model function schemas: a JSON list of OpenAI ones (`{"type": "function", "function":
{"name", "description", "parameters"}}`, the shape of a training record's `"tools"`), passed to the chat template as
`tools=` exactly as training passed them, so a model fine-tuned on tool calls is prompted as it was trained. Its
calls are printed as the template writes them (Qwen2.5 / ChatML: `<tool_call>{"name": ..., "arguments": ...}
</tool_call>`); a template that ignores `tools=` is refused.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING


from llmft.errors import ConfigError, exit_on_user_error
from llmft.inference import (
    DEVICE_CHOICES,
    DTYPE_CHOICES,
    generate_reply,
    load_for_inference,
    load_tools,
    require_tools_shown,
)
from llmft.tools.cli_flags import add_trust_remote_code_flag

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

RESET, EXIT = "/reset", "/exit"


def sampling_settings(args: argparse.Namespace) -> dict:
    """generate_reply's sampling keywords from the flags, after checking them all."""
    problems = []
    if args.temperature < 0:
        problems.append(f"--temperature {args.temperature}: must be 0 (greedy) or more")
    if not 0 < args.top_p <= 1:
        problems.append(f"--top_p {args.top_p}: must be in (0, 1]")
    if args.top_k < 0:
        problems.append(f"--top_k {args.top_k}: must be 0 (off) or more")
    if args.repetition_penalty <= 0:
        problems.append(f"--repetition_penalty {args.repetition_penalty}: must be positive (1 = off)")
    if args.max_new_tokens < 1:
        problems.append(f"--max_new_tokens {args.max_new_tokens}: must be at least 1")
    if problems:
        raise ConfigError(problems)
    return {
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
        "max_new_tokens": args.max_new_tokens,
    }


def start_messages(system: str | None) -> list[dict]:
    return [{"role": "system", "content": system}] if system else []


def chat_loop(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    system: str | None = None,
    tools: list[dict] | None = None,
    **sampling: float,
) -> None:
    """Read user turns from stdin until /exit or end of input; stream each reply to stdout. `tools` are shown to
    the model in every turn's prompt."""
    from transformers import TextStreamer

    interactive = sys.stdin.isatty()
    if interactive:
        print(f"{RESET} clears the conversation, {EXIT} or Ctrl-D quits.", file=sys.stderr)
    messages = start_messages(system)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    while True:
        try:
            line = input("\n>>> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text == EXIT:
            break
        if text == RESET:
            messages = start_messages(system)
            print("(conversation cleared)", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        reply = generate_reply(model, tokenizer, messages, streamer=streamer, tools=tools, **sampling)
        if not reply.finished:
            print(f"(cut at --max_new_tokens {sampling['max_new_tokens']})", file=sys.stderr)
        messages.append({"role": "assistant", "content": reply.text})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model_name_or_path",
        "--model",
        dest="model",
        required=True,
        help="model folder, adapter folder, GPTQ checkpoint or hub id",
    )
    parser.add_argument("--prompt", help="answer this one message, print the reply and exit")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument(
        "--tools",
        metavar="FILE",
        help="JSON list of OpenAI function schemas shown to the model (as in training data's tools)",
    )
    parser.add_argument("--temperature", type=float, default=0.7, help="0 decodes greedily")
    parser.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling; 1 turns it off")
    parser.add_argument("--top_k", type=int, default=0, help="sample from the k likeliest tokens; 0 turns it off")
    parser.add_argument("--repetition_penalty", type=float, default=1.0, help="1 turns it off")
    parser.add_argument("--max_new_tokens", type=int, default=512)
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    parser.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default="auto", help="auto: float32 on CPU, the checkpoint's own on a GPU"
    )
    parser.add_argument("--seed", type=int, help="seed for sampling, to repeat a sampled reply")
    add_trust_remote_code_flag(parser)
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    args = parse_args(argv)
    sampling = sampling_settings(args)
    tools = load_tools(args.tools) if args.tools else None  # before the model loads: a bad file fails at once
    model, tokenizer = load_for_inference(
        args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code
    )
    if args.seed is not None:
        from transformers import set_seed

        set_seed(args.seed)
    if tools:
        require_tools_shown(tokenizer, tools)
    if args.prompt is not None:
        messages = start_messages(args.system) + [{"role": "user", "content": args.prompt}]
        print(generate_reply(model, tokenizer, messages, tools=tools, **sampling).text)
        return
    chat_loop(model, tokenizer, system=args.system, tools=tools, **sampling)


if __name__ == "__main__":
    main()
