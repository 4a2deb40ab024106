"""
One turn of an interactive chat (scripts/chat_cli.py): does the user's message fit the model's context, and
streaming the answer so that Ctrl-C stops that answer but not the session. `reply_stop_tokens` is where a reply
ends, for chat_cli and the server (nanochat/web.py) alike; what a reply shows (and which special tokens it hides)
is nanochat.web.CompletionText, also shared by both.

Tests: tests/test_bad_input.py, tests/test_chat_eval.py.
"""


def reply_stop_tokens(tokenizer):
    """The tokens that end an assistant reply: <|assistant_end|>, and <|bos|> (a new document)."""
    return {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}


def reply_budget(context_tokens, message_tokens, sequence_len, max_tokens):
    """How many tokens the answer may have, or a message saying why the user's message is refused.
    context_tokens: the conversation so far; message_tokens: the new message with its framing special tokens
    (<|user_start|> ... <|user_end|><|assistant_start|>). The model was trained on sequence_len positions, so the
    prompt plus at least one answer token must fit there. -> (budget, None) or (0, reason)."""
    used = context_tokens + message_tokens
    if used + 1 > sequence_len:
        if message_tokens + 2 > sequence_len:  # not even alone with <|bos|> (and room for one answer token)
            return 0, (f"message too long: {message_tokens} tokens, the model's context holds {sequence_len}; "
                       f"shorten it")
        return 0, (f"message does not fit: {message_tokens} tokens after {context_tokens} of conversation, the "
                   f"model's context holds {sequence_len}; shorten it or type `clear` to start over")
    return min(max_tokens, sequence_len - used), None


def stream_reply(token_stream, stop_tokens, on_token):
    """Consume (token_column, masks) pairs from Engine.generate for one sample, calling on_token(token) for each
    token until one of stop_tokens. Ctrl-C (KeyboardInterrupt) ends the answer early instead of the program.
    -> (answer tokens without the stop token, interrupted)."""
    tokens = []
    try:
        for token_column, _ in token_stream:
            token = token_column[0]
            if token in stop_tokens:
                break
            tokens.append(token)
            on_token(token)
    except KeyboardInterrupt:
        return tokens, True
    finally:
        close = getattr(token_stream, "close", None)
        if close is not None:
            close()  # a generator stopped early: release its KV cache now
    return tokens, False
