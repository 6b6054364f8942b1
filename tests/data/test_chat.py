"""Chat format: exact Llama 3 dialog text, token ids, role and formatting masks."""

from __future__ import annotations

import pytest

from herd.data.chat import encode_dialog, render_dialog

DIALOG = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "  What is 2+2?\n"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "Check it in Python."},
    {"role": "assistant", "content": "print(2+2)", "python_tag": True},
    {"role": "ipython", "content": "4"},
    {"role": "assistant", "content": "It printed 4."},
]

EXPECTED = (
    "<|begin_of_text|>"
    "<|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nCheck it in Python.<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n<|python_tag|>print(2+2)<|eom_id|>"
    "<|start_header_id|>ipython<|end_header_id|>\n\n4<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nIt printed 4.<|eot_id|>"
)
PROMPT = "<|start_header_id|>assistant<|end_header_id|>\n\n"


def _decode_masked(tokenizer, encoded, mask):
    return tokenizer.decode([i for i, keep in zip(encoded.ids, mask, strict=True) if keep])


def test_renders_the_exact_llama3_format():
    assert render_dialog(DIALOG) == EXPECTED
    assert render_dialog(DIALOG[:2], add_generation_prompt=True).endswith("What is 2+2?<|eot_id|>" + PROMPT)


def test_ids_decode_back_to_the_text(tiny_tokenizer):
    encoded = encode_dialog(tiny_tokenizer, DIALOG)
    assert tiny_tokenizer.decode(encoded.ids) == EXPECTED
    assert len(encoded.ids) == len(encoded.role_mask) == len(encoded.format_mask)
    prompt = encode_dialog(tiny_tokenizer, DIALOG[:2], add_generation_prompt=True)
    assert tiny_tokenizer.decode(prompt.ids) == render_dialog(DIALOG[:2], add_generation_prompt=True)
    assert not any(prompt.role_mask)


def test_assistant_mask_is_content_plus_terminators(tiny_tokenizer):
    encoded = encode_dialog(tiny_tokenizer, DIALOG)
    written = "4<|eot_id|><|python_tag|>print(2+2)<|eom_id|>It printed 4.<|eot_id|>"
    assert _decode_masked(tiny_tokenizer, encoded, encoded.role_mask) == written
    content_only = [r and not f for r, f in zip(encoded.role_mask, encoded.format_mask, strict=True)]
    assert _decode_masked(tiny_tokenizer, encoded, content_only) == "4<|python_tag|>print(2+2)It printed 4."


def test_format_mask_is_headers_and_terminators(tiny_tokenizer):
    encoded = encode_dialog(tiny_tokenizer, DIALOG)
    expected = "<|begin_of_text|>" + "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
        + ("<|eom_id|>" if m.get("python_tag") else "<|eot_id|>")
        for m in DIALOG
    )
    assert _decode_masked(tiny_tokenizer, encoded, encoded.format_mask) == expected


def test_other_roles_can_be_selected(tiny_tokenizer):
    encoded = encode_dialog(tiny_tokenizer, DIALOG, roles=("user",))
    assert _decode_masked(tiny_tokenizer, encoded, encoded.role_mask) == (
        "What is 2+2?<|eot_id|>Check it in Python.<|eot_id|>"
    )


def test_eom_flag_overrides_the_terminator(tiny_tokenizer):
    messages = [{"role": "assistant", "content": "wait", "eom": True}]
    assert render_dialog(messages).endswith("wait<|eom_id|>")
    assert encode_dialog(tiny_tokenizer, messages).ids[-1] == tiny_tokenizer.special_id("eom_id")


def test_transformers_chat_template_agrees(tiny_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_tokenizer.save(tmp_path / "tok"))
    assert hf.apply_chat_template(DIALOG, tokenize=False) == EXPECTED
    assert hf.apply_chat_template(DIALOG[:2], tokenize=False, add_generation_prompt=True).endswith(PROMPT)
    assert hf(EXPECTED, add_special_tokens=False)["input_ids"] == encode_dialog(tiny_tokenizer, DIALOG).ids


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([{"role": "robot", "content": "hi"}], "message 0: role 'robot'"),
        (
            [{"role": "user", "content": "hi"}, {"role": "user", "content": 3}],
            "message 1 \\(user\\): content",
        ),
        ([("user", "hi")], "message 0 is a tuple"),
        ("hello", "a dialog is a list"),
    ],
)
def test_malformed_dialogs_name_the_message(tiny_tokenizer, messages, message):
    with pytest.raises(ValueError, match=message):
        encode_dialog(tiny_tokenizer, messages)
