"""The chat format: one Jinja template, used by the server and written into exported tokenizer files.

The template is the DeepSeek chat format of the released deepseek-moe-16b-chat tokenizer: the bos token, then a
system message as plain text, "User: ...\\n\\n" turns and "Assistant: ..." turns closed by the eos token, ending with
"Assistant:" for the model to continue. A checkpoint whose tokenizer_config.json carries its own `chat_template`
is rendered with that one instead, exactly as transformers' `apply_chat_template` would render it.
"""

from __future__ import annotations

from typing import Any

CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def render_chat(messages: list[dict[str, Any]], *, bos_token: str, eos_token: str, template: str | None = None,
                add_generation_prompt: bool = True) -> str:
    """Render messages ({"role", "content": str}) to the prompt text, as transformers' apply_chat_template does.

    The environment matches transformers' (sandboxed, trim_blocks, lstrip_blocks), so a template from a tokenizer
    file renders to the same characters here and there.
    """
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    compiled = env.from_string(CHAT_TEMPLATE if template is None else template)
    return compiled.render(messages=messages, bos_token=bos_token, eos_token=eos_token,
                           add_generation_prompt=add_generation_prompt)
