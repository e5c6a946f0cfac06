"""Role markers derived from real Hugging Face chat templates (rendered with Jinja, no model)."""

from __future__ import annotations

from radixflow.lang.chat_template import RoleTemplate, jinja_renderer

# SmolLM2's template: ChatML that injects a default system prompt when the first message is not a system message.
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Mistral-Instruct v0.1: user/assistant must alternate starting with user; any other role raises.
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


def like_transformers(render):
    """transformers' apply_chat_template refuses an empty conversation."""
    def refusing_empty(messages, add_generation_prompt):
        if not messages:
            raise ValueError("Cannot apply chat template to an empty conversation.")
        return render(messages, add_generation_prompt)
    return refusing_empty


def test_chatml_markers_leave_out_the_injected_default_system_prompt():
    template = RoleTemplate.from_renderer(like_transformers(jinja_renderer(SMOLLM2)))
    for role in ("system", "user", "assistant"):
        assert template.prefix(role) == f"<|im_start|>{role}\n"
        assert template.suffix(role) == "<|im_end|>\n"


def test_a_template_that_refuses_system_messages_still_gives_user_and_assistant_markers():
    template = RoleTemplate.from_renderer(like_transformers(jinja_renderer(MISTRAL, bos_token="<s>",
                                                                          eos_token="</s>")))
    assert (template.prefix("user"), template.suffix("user")) == ("[INST] ", " [/INST]")
    assert (template.prefix("assistant"), template.suffix("assistant")) == ("", "</s>")
    plain = RoleTemplate.plain()  # no rendering has a system message: plain markers rather than no backend at all
    assert (template.prefix("system"), template.suffix("system")) == (plain.prefix("system"), plain.suffix("system"))
