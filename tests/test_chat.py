"""The chat template renders the DeepSeek chat format, character for character."""

from deepseekmoe.data.chat import render_chat


def test_render_chat_matches_the_deepseek_format():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "2+2?"},
    ]
    text = render_chat(messages, bos_token="<B>", eos_token="<E>")
    assert text == "<B>Be brief.\n\nUser: Hi\n\nAssistant: Hello.<E>User: 2+2?\n\nAssistant:"
    closed = render_chat(messages[:2], bos_token="<B>", eos_token="<E>", add_generation_prompt=False)
    assert closed == "<B>Be brief.\n\nUser: Hi\n\n"


def test_render_chat_uses_a_given_template():
    text = render_chat([{"role": "user", "content": "x"}], bos_token="", eos_token="",
                       template="{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}")
    assert text == "[user]x"
