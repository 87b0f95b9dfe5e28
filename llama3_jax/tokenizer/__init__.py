"""Llama 3 tokenizer and chat format."""

from llama3_jax.tokenizer.chat_format import ChatFormat, Message, ToolCall
from llama3_jax.tokenizer.tokenizer import Tokenizer

__all__ = ["ChatFormat", "Message", "ToolCall", "Tokenizer"]
