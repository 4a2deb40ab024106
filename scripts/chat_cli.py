"""
Chat with a trained model in the terminal. Tokens stream as they are generated; calculator tool calls and
their outputs are shown inline as [python] ... and [output] ...

one GPU / CPU:  python -m scripts.chat_cli -i sft
one answer:     python -m scripts.chat_cli -i sft -p "Why is the sky blue?"
tiny, CPU:      python -m scripts.chat_cli -i sft -p "hello" -m 32

Commands: `clear` starts a new conversation, `quit` or `exit` leaves. Line editing and history (readline,
kept in <base_dir>/chat_cli_history); Ctrl-C during an answer stops that answer, Ctrl-C or Ctrl-D at the prompt
leaves. A message that does not fit the model's context is refused and the session goes on.
"""

import os

import torch

from nanochat.chat_turn import reply_budget, stream_reply
from nanochat.checkpoint_manager import load_model
from nanochat.common import (UserError, autocast_ctx, autodetect_device_type, compute_cleanup, compute_init,
                             get_base_dir, install_error_handler)
from nanochat.config import ArgumentParser, bounded
from nanochat.engine import Engine

install_error_handler()  # a UserError prints one line `error: ...` and exits with code 2

SPECIAL_DISPLAY = {  # how the tool-use special tokens are shown
    "<|python_start|>": "\n[python] ",
    "<|python_end|>": "\n",
    "<|output_start|>": "[output] ",
    "<|output_end|>": "\n",
}


class StreamPrinter:
    """Prints tokens as they arrive: ordinary tokens are decoded incrementally (so multi-byte characters split
    across tokens print whole), tool-use special tokens become visible markers."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special = {tokenizer.encode_special(name): text for name, text in SPECIAL_DISPLAY.items()}
        self.pending, self.printed = [], ""

    def _flush_text(self, final=False):
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        if not final and text.endswith("\ufffd"):
            return  # an incomplete UTF-8 sequence: wait for the next token
        print(text[len(self.printed):], end="", flush=True)
        self.printed = text

    def add(self, token):
        if token in self.special:
            self._flush_text(final=True)
            self.pending, self.printed = [], ""
            print(self.special[token], end="", flush=True)
        else:
            self.pending.append(token)
            self._flush_text()

    def finish(self):
        self._flush_text(final=True)
        self.pending, self.printed = [], ""
        print(flush=True)


def main(argv=None):
    # ------------------------------------------------------------------------------------------------------
    # Config

    parser = ArgumentParser(description="Chat with the model")
    parser.add_argument("-i", "--source", type=str, default="sft", choices=["base", "mid", "sft", "rl"],
                        help="which checkpoint family to load")
    parser.add_argument("-g", "--model-tag", type=str, default=None, help="model tag, e.g. d20 (default: largest)")
    parser.add_argument("-s", "--step", type=bounded(int, min=0), default=None, help="checkpoint step (default: last)")
    parser.add_argument("-p", "--prompt", type=str, default="", help="answer this one prompt and exit")
    parser.add_argument("-t", "--temperature", type=bounded(float, min=0.0), default=0.6, help="sampling temperature")
    parser.add_argument("-k", "--top-k", type=bounded(int, min=0), default=50, help="top-k sampling")
    parser.add_argument("-m", "--max-tokens", type=bounded(int, min=1), default=256, help="most tokens per answer")
    parser.add_argument("-d", "--dtype", type=str, default="bfloat16", choices=["float32", "bfloat16"],
                        help="autocast dtype (bf16 autocast applies on CUDA only)")
    args = parser.parse_args(argv)

    # ------------------------------------------------------------------------------------------------------
    # Compute init, model and tokenizer

    device_type = autodetect_device_type()
    _, _, _, _, device = compute_init(device_type)
    model, tokenizer, _ = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    engine = Engine(model, tokenizer)
    autocast = autocast_ctx(device_type, args.dtype)
    bos = tokenizer.get_bos_token_id()
    user_start, user_end = tokenizer.encode_special("<|user_start|>"), tokenizer.encode_special("<|user_end|>")
    assistant_start = tokenizer.encode_special("<|assistant_start|>")
    assistant_end = tokenizer.encode_special("<|assistant_end|>")

    # ------------------------------------------------------------------------------------------------------
    # Chat loop: the conversation is kept as tokens, rendered as render_conversation does

    sequence_len = model.config.sequence_len
    history_file = os.path.join(get_base_dir(), "chat_cli_history")
    if not args.prompt:
        try:
            import readline  # line editing and history for input()

            readline.set_history_length(1000)
            if os.path.exists(history_file):
                readline.read_history_file(history_file)
        except (ImportError, OSError):
            readline = None
        print("nanochat — type `clear` to start over, `quit` or `exit` to leave; Ctrl-C stops an answer.")
    conversation_tokens = [bos]
    while True:
        if args.prompt:
            user_input = args.prompt
        else:
            try:
                user_input = input("\nUser: ").strip()
            except (EOFError, KeyboardInterrupt):
                print()
                break
            if user_input.lower() in ("quit", "exit"):
                break
            if user_input.lower() == "clear":
                conversation_tokens = [bos]
                print("(conversation cleared)")
                continue
            if not user_input:
                continue
        message = [user_start, *tokenizer.encode(user_input), user_end, assistant_start]
        budget, refusal = reply_budget(len(conversation_tokens), len(message), sequence_len, args.max_tokens)
        if refusal is not None:
            if args.prompt:
                raise UserError(f"-p/--prompt: {refusal}")
            print(f"({refusal})")
            continue
        if not args.prompt:
            print()
        conversation_tokens += message

        print("Assistant: ", end="", flush=True)
        printer = StreamPrinter(tokenizer)
        with autocast, torch.no_grad():
            stream = engine.generate(conversation_tokens, num_samples=1, max_tokens=budget,
                                     temperature=args.temperature, top_k=args.top_k)
            response_tokens, interrupted = stream_reply(stream, {assistant_end, bos}, printer.add)
        printer.finish()
        if interrupted:
            print("(answer stopped)")
        conversation_tokens += response_tokens + [assistant_end]
        if args.prompt:
            break

    # ------------------------------------------------------------------------------------------------------
    # Cleanup

    if not args.prompt and readline is not None:
        try:
            readline.write_history_file(history_file)
        except OSError:
            pass  # history is a convenience: an unwritable base dir must not fail the session
    compute_cleanup()


if __name__ == "__main__":
    main()
