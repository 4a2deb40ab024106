"""
Chat with a trained model in the terminal. Tokens stream as they are generated, shown exactly as the web server
shows them (nanochat.web.CompletionText): calculator calls inline as <<expr=result>>, other special tokens hidden
(and kept out of the conversation); a reply ends where the server's does (nanochat.chat_turn.reply_stop_tokens).

one GPU / CPU:  python -m scripts.chat_cli -i sft
one answer:     python -m scripts.chat_cli -i sft -p "Why is the sky blue?"
tiny, CPU:      python -m scripts.chat_cli -i sft -p "hello" -m 32

Commands: `clear` starts a new conversation, `quit` or `exit` leaves. Line editing and history (readline,
kept in <base_dir>/chat_cli_history); Ctrl-C during an answer stops that answer, Ctrl-C or Ctrl-D at the prompt
leaves. A message that does not fit the model's context is refused and the session goes on.
"""

import os

import torch

from nanochat.chat_turn import reply_budget, reply_stop_tokens, stream_reply
from nanochat.checkpoint_manager import SOURCE_DIRS, load_model
from nanochat.common import (UserError, autocast_ctx, autodetect_device_type, compute_cleanup, compute_init,
                             get_base_dir, install_error_handler)
from nanochat.config import Option, load_config
from nanochat.engine import Engine
from nanochat.web import CompletionText

install_error_handler()  # a UserError prints one line `error: ...` and exits with code 2

OPTIONS = [
    Option("source", str, "sft", "which checkpoint family to load", choices=tuple(SOURCE_DIRS), short="i"),
    Option("model_tag", str, None, "model tag, e.g. d20 (default: the most recently written; 'largest': the largest "
                                   "d<depth>)", short="g"),
    Option("step", int, None, "checkpoint step (default: last)", min=0, short="s"),
    Option("prompt", str, "", "answer this one prompt and exit (empty: interactive)", short="p"),
    Option("temperature", float, 0.6, "sampling temperature (0: greedy)", min=0.0, short="t"),
    Option("top_k", int, 50, "top-k sampling (0: off)", min=0, short="k"),
    Option("max_tokens", int, 256, "most tokens per answer", min=1, short="m"),
    Option("dtype", str, "bfloat16", "autocast dtype (bf16 autocast applies on CUDA only)",
           choices=("float32", "bfloat16"), short="d"),
]

def main(argv=None):
    # ------------------------------------------------------------------------------------------------------
    # Config

    config = load_config(OPTIONS, argv, description=__doc__, verbose=False)

    # ------------------------------------------------------------------------------------------------------
    # Compute init, model and tokenizer

    device_type = autodetect_device_type()
    _, _, _, _, device = compute_init(device_type)
    model, tokenizer, _ = load_model(config["source"], device, phase="eval", model_tag=config["model_tag"],
                                     step=config["step"])
    engine = Engine(model, tokenizer)
    autocast = autocast_ctx(device_type, config["dtype"])
    bos = tokenizer.get_bos_token_id()
    user_start, user_end = tokenizer.encode_special("<|user_start|>"), tokenizer.encode_special("<|user_end|>")
    assistant_start = tokenizer.encode_special("<|assistant_start|>")
    assistant_end = tokenizer.encode_special("<|assistant_end|>")
    stop_tokens = reply_stop_tokens(tokenizer)

    # ------------------------------------------------------------------------------------------------------
    # Chat loop: the conversation is kept as tokens, rendered as render_conversation does

    sequence_len = model.config.sequence_len
    history_file = os.path.join(get_base_dir(), "chat_cli_history")
    if not config["prompt"]:
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
        if config["prompt"]:
            user_input = config["prompt"]
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
        budget, refusal = reply_budget(len(conversation_tokens), len(message), sequence_len, config["max_tokens"])
        if refusal is not None:
            if config["prompt"]:
                raise UserError(f"-p/--prompt: {refusal}")
            print(f"({refusal})")
            continue
        if not config["prompt"]:
            print()
        conversation_tokens += message

        print("Assistant: ", end="", flush=True)
        reply = CompletionText(tokenizer)
        with autocast, torch.no_grad():
            stream = engine.generate(conversation_tokens, num_samples=1, max_tokens=budget,
                                     temperature=config["temperature"], top_k=config["top_k"])
            response_tokens, interrupted = stream_reply(stream, stop_tokens,
                                                        lambda token: print(reply.add(token), end="", flush=True))
        print(reply.finish(), flush=True)
        if interrupted:
            print("(answer stopped)")
        conversation_tokens += [t for t in response_tokens if t not in reply.hidden] + [assistant_end]
        if config["prompt"]:
            break

    # ------------------------------------------------------------------------------------------------------
    # Cleanup

    if not config["prompt"] and readline is not None:
        try:
            readline.write_history_file(history_file)
        except OSError:
            pass  # history is a convenience: an unwritable base dir must not fail the session
    compute_cleanup()


if __name__ == "__main__":
    main()
