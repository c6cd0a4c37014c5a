"""Tokenizers and chat templates come from transformers (tokenizers only: no torch)."""

from __future__ import annotations

from .io.checkpoint import resolve_model_path


def load_tokenizer(name_or_path: str):
    """An HF fast tokenizer for a local folder or hub id; pad token falls back to eos for batching."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # tokenizers/transformers raise bare Exceptions on damaged files
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"{path}: cannot load the tokenizer ({e.__class__.__name__}: {first[:200]}); restore or "
                         "re-download tokenizer.json / tokenizer_config.json") from None
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


def format_prompt(tokenizer, prompt_or_messages, chat: bool | None = None, enable_thinking: bool | None = None) -> str:
    """A plain string, or chat messages through the tokenizer's template with the generation prompt appended."""
    if isinstance(prompt_or_messages, str):
        if chat is False or (chat is None and not getattr(tokenizer, "chat_template", None)):
            return prompt_or_messages
        messages = [{"role": "user", "content": prompt_or_messages}]
    else:
        messages = list(prompt_or_messages)
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
