"""
Chat with a trained model in the terminal. Tokens stream as they are generated; calculator tool calls and
their outputs are shown inline as [python] ... and [output] ...

one GPU / CPU:  python -m scripts.chat_cli -i sft
one answer:     python -m scripts.chat_cli -i sft -p "Why is the sky blue?"
tiny, CPU:      python -m scripts.chat_cli -i sft -p "hello" -m 32

Commands: `clear` starts a new conversation, `quit` or `exit` leaves.
"""

import argparse

import torch

from nanochat.checkpoint_manager import load_model
from nanochat.common import autocast_ctx, autodetect_device_type, compute_cleanup, compute_init, install_error_handler
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

    parser = argparse.ArgumentParser(description="Chat with the model")
    parser.add_argument("-i", "--source", type=str, default="sft", choices=["base", "mid", "sft"],
                        help="which checkpoint family to load")
    parser.add_argument("-g", "--model-tag", type=str, default=None, help="model tag, e.g. d20 (default: largest)")
    parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: last)")
    parser.add_argument("-p", "--prompt", type=str, default="", help="answer this one prompt and exit")
    parser.add_argument("-t", "--temperature", type=float, default=0.6, help="sampling temperature")
    parser.add_argument("-k", "--top-k", type=int, default=50, help="top-k sampling")
    parser.add_argument("-m", "--max-tokens", type=int, default=256, help="most tokens per answer")
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

    if not args.prompt:
        print("nanochat — type `clear` to start over, `quit` or `exit` to leave.")
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
        if not args.prompt:
            print()
        conversation_tokens += [user_start, *tokenizer.encode(user_input), user_end, assistant_start]

        print("Assistant: ", end="", flush=True)
        printer = StreamPrinter(tokenizer)
        response_tokens = []
        with autocast, torch.no_grad():
            for token_column, _ in engine.generate(conversation_tokens, num_samples=1, max_tokens=args.max_tokens,
                                                   temperature=args.temperature, top_k=args.top_k):
                token = token_column[0]
                if token == assistant_end or token == bos:
                    break
                response_tokens.append(token)
                printer.add(token)
        printer.finish()
        conversation_tokens += response_tokens + [assistant_end]
        if args.prompt:
            break

    # ------------------------------------------------------------------------------------------------------
    # Cleanup

    compute_cleanup()


if __name__ == "__main__":
    main()
