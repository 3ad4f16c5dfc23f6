"""`finetune chat`: talk to a fine-tuned causal LM (a checkpoint or an export folder) in the terminal.

    finetune chat --ckpt_path runs/sgd_assistant/version_0/checkpoints/last.ckpt
    finetune chat --export runs/sgd_assistant/version_0/export/merged --max_new_tokens 128

The reply streams as it is generated; the conversation is kept (the oldest exchanges are dropped when it
grows past `--max_length` tokens); `/reset` starts over, `/exit` (or end of input) quits. The system
prompt is the run's (`data.system_prompt`), its `{placeholders}` filled with `--var name=value`, or
`--system` gives another. Input may be piped: one user message per line.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any, Iterable, TextIO

from finetune_lab.errors import InputError


def load_checkpoint_chat(path: str):
    """(model, tokenizer, system prompt, generation kwargs) of a `finetune` checkpoint of a CausalLM run."""
    from lightning_modules.module import TaskModule
    from lightning_modules.tasks.causal_lm import CausalLM

    if not os.path.isfile(path):
        raise InputError(f"finetune chat: checkpoint '{path}' does not exist.")
    module = TaskModule.load_from_checkpoint(path, map_location="cpu")
    if not isinstance(module.task, CausalLM):
        raise InputError(f"finetune chat: '{path}' is a {type(module.task).__name__} checkpoint; chat needs a CausalLM run.")
    return module.model.eval(), module.task.tokenizer, module.task.system_prompt, module.task.generation_kwargs()


def load_export_chat(folder: str):
    """(model, tokenizer, system prompt, generation kwargs) of an export folder (merged model or peft adapter)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(folder):
        raise InputError(f"finetune chat: export folder '{folder}' does not exist.")
    if os.path.isfile(os.path.join(folder, "adapter_config.json")):
        from callbacks.export import load_adapter_export

        model = load_adapter_export(folder)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    settings: dict[str, Any] = {}
    path = os.path.join(folder, "finetune_chat.json")
    if os.path.isfile(path):
        with open(path) as f:
            settings = json.load(f)
    generation = {k: v for k, v in (settings.get("generation") or {}).items() if v is not None}
    return model.eval(), tokenizer, settings.get("system_prompt"), generation


def fill_system_prompt(prompt: str | None, variables: dict[str, str]) -> str | None:
    if not prompt:
        return prompt
    names = sorted(set(re.findall(r"{(\w+)}", prompt)))
    missing = [n for n in names if n not in variables]
    if missing:
        raise InputError(f"finetune chat: the run's system prompt {prompt!r} has placeholders {missing}; give them with "
                         f"--var {missing[0]}=..., or pass --system '...'.")
    return prompt.format(**variables)


class ChatSession:
    """The conversation state and one reply per user message (streamed to `out`)."""

    def __init__(self, model, tokenizer, system_prompt: str | None, generation: dict[str, Any], max_length: int = 1024) -> None:
        self.model, self.tokenizer, self.generation = model, tokenizer, dict(generation)
        self.system_prompt, self.max_length = system_prompt, max_length
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict[str, str]] = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []

    def prompt_ids(self):
        import torch

        while True:
            ids = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"]
            system = 1 if self.messages and self.messages[0]["role"] == "system" else 0
            if len(ids) <= self.max_length or len(self.messages) - system <= 1:
                return torch.tensor([ids])
            del self.messages[system:system + 2]  # the oldest exchange

    def reply(self, text: str, out: TextIO) -> str:
        import torch
        from transformers import TextStreamer

        self.messages.append({"role": "user", "content": text})
        ids = self.prompt_ids()

        class _Streamer(TextStreamer):
            def on_finalized_text(self, chunk: str, stream_end: bool = False) -> None:
                out.write(chunk)
                out.flush()

        streamer = _Streamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.no_grad():
            generated = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pad_token_id=pad,
                                            streamer=streamer, **self.generation)
        answer = self.tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True).strip()
        out.write("\n")
        self.messages.append({"role": "assistant", "content": answer})
        return answer


def run(session: ChatSession, lines: Iterable[str], out: TextIO, interactive: bool) -> None:
    if interactive:
        out.write("finetune chat: type a message; /reset starts over, /exit quits.\n")
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            session.reset()
            out.write("(conversation reset)\n")
            continue
        out.write("assistant> ")
        session.reply(text, out)
        if interactive:
            out.write("you> ")
            out.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="finetune chat", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt_path", help="a checkpoint of a CausalLM run (.ckpt)")
    source.add_argument("--export", help="an export folder (merged model, or a peft adapter)")
    parser.add_argument("--system", help="system prompt (default: the run's data.system_prompt)")
    parser.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                        help="fill a {placeholder} of the run's system prompt (repeatable)")
    parser.add_argument("--max_new_tokens", type=int)
    parser.add_argument("--do_sample", action="store_true", help="sample instead of the run's decoding")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top_p", type=float)
    parser.add_argument("--max_length", type=int, default=1024, help="tokens of history kept (oldest exchanges dropped)")
    args = parser.parse_args(argv)
    variables = {}
    for item in args.var:
        name, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"finetune chat: --var takes NAME=VALUE, got {item!r}.")
        variables[name] = value
    model, tokenizer, system, generation = (load_checkpoint_chat(args.ckpt_path) if args.ckpt_path
                                            else load_export_chat(args.export))
    if not tokenizer.chat_template:
        raise InputError("finetune chat: the model's tokenizer has no chat template (a raw-text run?).")
    system = args.system if args.system is not None else fill_system_prompt(system, variables)
    for key in ("max_new_tokens", "temperature", "top_p"):
        if getattr(args, key) is not None:
            generation[key] = getattr(args, key)
    if args.do_sample:
        generation["do_sample"] = True
        generation.setdefault("temperature", 0.7)
    interactive = sys.stdin.isatty()
    if interactive:
        sys.stdout.write("you> ")
        sys.stdout.flush()
    run(ChatSession(model, tokenizer, system, generation, args.max_length), sys.stdin, sys.stdout, interactive)
