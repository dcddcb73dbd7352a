"""Chat rows (messages, ShareGPT) and a base model's own chat template: reading, identifying, rendering.

The byte-for-byte agreement with what Axolotl trains and what Ollama/llama-server render is in
tests/test_parity_go.py and the chat end-to-end test; here: what each row means, and which own templates
tutor_wrap can serve (and which it refuses).
"""

import json

import pytest

from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.data.chat_templates import CHATML, LLAMA3, identify, render_jinja
from tutor_wrap.data.formats import get

pytestmark = pytest.mark.unit

SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system"
           "\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>'"
           " + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt"
           " %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Meta-Llama-3-8B-Instruct's tokenizer_config.json chat_template (it writes the BOS itself).
META_LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
               "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
               "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
               "{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant"
               "<|end_header_id|>\\n\\n' }}{% endif %}")


def test_smollm2s_template_is_chatml_with_its_default_system():
    t = identify(SMOLLM2)
    assert t is not None and t.name == "chatml" and t.axolotl == "tokenizer_default"
    assert t.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert t.jinja == SMOLLM2      # the merged model and the GGUF keep the model's own text
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "?"}]
    assert t.render_messages(conv) == render_jinja(SMOLLM2, conv)


def test_meta_llama3s_template_is_llama3_without_its_bos():
    t = identify(META_LLAMA3)
    assert t is not None and t.name == "llama3" and t.default_system == ""


def test_templates_with_anything_else_are_refused():
    dated = SMOLLM2.replace("You are a helpful AI", "Today is {{ strftime_now('%d %b') }}. You are a helpful AI")
    extra_newline = CHATML.jinja.replace("<|im_end|>\\n", "<|im_end|>\\n\\n")
    assert identify(dated) is None
    assert identify(extra_newline) is None
    assert identify("{{ raise_exception('tools only') }}") is None
    assert identify(CHATML.jinja) == CHATML.with_default_system("", CHATML.jinja)


def rows(tmp_path, *objs, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return p


CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"},
        {"role": "assistant", "content": "An ordered collection."}, {"role": "user", "content": "And a tuple?"},
        {"role": "assistant", "content": "An immutable one."}]


def test_a_conversation_is_prompted_up_to_its_last_user_turn(tmp_path):
    fmt = get("chat", CHATML)
    row = fmt.read(rows(tmp_path, {"messages": CONV})).rows[0]
    assert fmt.messages(row) == CONV[:4]
    assert fmt.answer(row) == "An immutable one."
    assert fmt.prompt(row) == CHATML.render_messages(CONV[:4])
    assert fmt.training_text(row) == CHATML.render_messages(CONV, add_generation_prompt=False)
    assert fmt.user_turn(row) == "And a tuple?"
    # held-out prompts may stop at the user turn (no reference answer)
    ev = fmt.read(rows(tmp_path, {"messages": CONV[:4]}, name="e.jsonl"), require_output=False).rows[0]
    assert fmt.answer(ev) == "" and fmt.prompt(ev) == fmt.prompt(row)


def test_sharegpt_rows_mean_the_same_conversation(tmp_path):
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    share = get("sharegpt", LLAMA3).read(rows(tmp_path, {"conversations": [
        {"from": names[m["role"]], "value": m["content"]} for m in CONV]})).rows[0]
    chat = get("chat", LLAMA3).read(rows(tmp_path, {"messages": CONV}, name="c.jsonl")).rows[0]
    assert share.messages == chat.messages


def test_the_axolotl_entry_maps_sharegpt_roles_and_keeps_the_loss_knobs():
    from tutor_wrap.recipe.schema import DatasetSpec

    spec = DatasetSpec(path="x.jsonl", format="sharegpt", chat_template="chatml", roles_to_train=["assistant", "user"],
                       train_on_eos="last")
    fmt = get("sharegpt", CHATML)
    entry = fmt.axolotl_dataset(spec, "x.jsonl")
    assert entry["type"] == "chat_template" and entry["field_messages"] == "conversations"
    assert entry["message_property_mappings"] == {"role": "from", "content": "value"}
    assert entry["roles"] == {"system": ["system"], "user": ["human", "user"], "assistant": ["gpt", "assistant"]}
    assert entry["roles_to_train"] == ["assistant", "user"] and entry["train_on_eos"] == "last"
    assert fmt.axolotl_settings() == {"chat_template": "chatml", "eot_tokens": ["<|im_end|>"]}


def test_duplicate_conversations_are_a_warning(tmp_path):
    row = {"messages": CONV[1:3]}
    data = get("chat", CHATML).read(rows(tmp_path, row, {"messages": CONV}, row))
    assert len(data.rows) == 3 and "line 3 duplicate" in data.warnings[0]


def test_problems_are_reported_with_their_lines(tmp_path):
    bad = [{"messages": CONV[1:3]}] + [{"messages": [CONV[1]]}] * 7
    with pytest.raises(TutorWrapError, match=r"line 2, 3, 4, 5, 6 and 2 more: the conversation does not end"):
        get("chat", CHATML).read(rows(tmp_path, *bad))
