"""Chat templates for models that ship without one (base models such as Gemma 3 270M), by name.

``model.chat_template`` takes one of these names or a Jinja template of its own; ``load_tokenizer`` sets it on
the tokenizer, so chat prompts render through ``apply_chat_template`` as they would with a template that came
with the model, and the exported tokenizer carries it.
"""

from __future__ import annotations

CHAT_TEMPLATES = {
    # ChatML (Qwen, SmolLM2): <|im_start|>role\ncontent<|im_end|>\n per message.
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # Gemma's turns (its instruction-tuned models' layout, whose tokens a Gemma base vocabulary has): the template
    # writes <bos> itself, and a system message is folded into the first user turn, as Gemma's own template does.
    "gemma": (
        "{{ bos_token }}{% set ns = namespace(system='') %}{% for m in messages %}"
        "{% if m['role'] == 'system' %}{% set ns.system = m['content'] + '\\n\\n' %}"
        "{% else %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n' }}"
        "{% if m['role'] == 'user' %}{{ ns.system }}{% set ns.system = '' %}{% endif %}"
        "{{ m['content'] | trim }}{{ '<end_of_turn>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
    ),
}


def resolve_chat_template(value: str) -> str:
    """The Jinja template ``value`` names (a key of ``CHAT_TEMPLATES``) or is; a clear error for anything else."""
    if value in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[value]
    if "{{" not in value and "{%" not in value:
        raise ValueError(
            f"model.chat_template={value!r} is neither a named template ({', '.join(map(repr, CHAT_TEMPLATES))}) "
            "nor a Jinja template."
        )
    import jinja2

    try:
        jinja2.Environment().parse(value)
    except jinja2.TemplateSyntaxError as err:
        raise ValueError(f"model.chat_template is not a valid Jinja template: {err}") from err
    return value
