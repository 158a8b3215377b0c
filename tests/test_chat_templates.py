"""Chat templates: our ids and loss masks against transformers' apply_chat_template.

The tokenizer is built in the test: a byte-level BPE trained on a tiny corpus with Qwen's
pre-tokenizer regex and the chat special tokens, saved as tokenizer.json next to a
tokenizer_config.json that carries the model family's jinja chat template.
"""

import json

import pytest

from cftjax import chat_templates, objectives
from cftjax.chat_templates import Conversation, Turn
from cftjax.data.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

# Qwen2.5's template without the tool-calling branches (identical output without tools).
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Llama 3 (8B Instruct) template.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# Llama 3.1 / 3.3 Instruct without tools: a dated system block always opens the conversation.
LLAMA3_1_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
QWEN_PRETOKENIZE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
CORPUS = [
    "Question: What is 12 + 30? Solution: 12 + 30 = 42. The answer is 42.",
    "Please critique whether the following solution to the question is correct.",
    "Critique: The solution adds the numbers correctly.\nConclusion: right",
    "Critique: Step 2 multiplies instead of adding.\nConclusion: wrong",
    "You are a helpful assistant. Let x = 3; then 2x + 1 = 7, so x² − 1 = 8.",
    "Step 1:\n\nStep 2:\n\n",  # so that "\n\n" is one token, as in Qwen's vocabulary
] * 5

RECORDS = {
    "sft": {
        "objective": "sft",
        "query": "What is 12 + 30?",
        "response": "12 + 30 = 42.\nThe answer is 42.",
        "critique": "",
        "system": "",
        "history": "[]",
        "answer": "42",
        "label": "",
    },
    "sft_system_history": {
        "objective": "sft",
        "query": "And 2x + 1 = 7?",
        "response": "  x = 3 (solve for x)",
        "critique": "",
        "system": "You are a careful tutor.",
        "history": json.dumps(
            [{"role": "user", "content": "Let x be a number."}, {"role": "assistant", "content": "Sure."}]
        ),
        "answer": "3",
        "label": "",
    },
    "cft": {
        "objective": "cft",
        "query": "What is 12 + 30?\n",
        "response": "Step 1: 12 + 30 = 52.\nAnswer: 52 ",
        "critique": "Step 1 is wrong: 12 + 30 = 42, not 52.\nConclusion: wrong",
        "system": "",
        "history": "[]",
        "answer": "42",
        "label": "wrong",
    },
}


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.normalizer = tokenizers.normalizers.NFC()
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
      [
          tokenizers.pre_tokenizers.Split(tokenizers.Regex(QWEN_PRETOKENIZE), behavior="isolated"),
          tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
      ]
  )
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=400,
      special_tokens=SPECIAL_TOKENS,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
  )
  tok.train_from_iterator(CORPUS, trainer)
  path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
  tok.save(str(path))
  return path


def _model_dir(tmp_path, tokenizer_json, template: str):
  (tmp_path / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
  if template == "qwen":
    config = {
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "chat_template": QWEN_TEMPLATE,
    }
  else:
    jinja = LLAMA3_TEMPLATE if template == "llama3" else LLAMA3_1_TEMPLATE
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": jinja}
  config["tokenizer_class"] = "PreTrainedTokenizerFast"
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
  return tmp_path


def _messages(conversation: Conversation) -> list[dict]:
  turns = [{"role": t.role, "content": t.content} for t in conversation.context]
  return turns + [{"role": "assistant", "content": conversation.reply}]


def _hf_ids(hf_tokenizer, messages, add_generation_prompt=False) -> list[int]:
  out = hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
  return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("template", ["qwen", "llama3", "llama3_1"])
@pytest.mark.parametrize("record_name", sorted(RECORDS))
def test_ids_and_mask_match_apply_chat_template(template, record_name, tmp_path, tokenizer_json):
  model_dir = _model_dir(tmp_path, tokenizer_json, template)
  ours = load_tokenizer(model_dir)
  reference = transformers.AutoTokenizer.from_pretrained(model_dir)
  record = RECORDS[record_name]
  conversation = objectives.to_conversation(record)

  ids, mask = objectives.encode_example(record, ours, template)
  messages = _messages(conversation)
  assert ids == _hf_ids(reference, messages)
  # The mask starts exactly where the generation prompt ends, i.e. at the assistant content.
  prompt = _hf_ids(reference, messages[:-1], add_generation_prompt=True)
  assert mask.index(1) == len(prompt) and ids[: len(prompt)] == prompt
  assert chat_templates.prompt_ids(conversation.context, template, ours) == prompt
  # ... and covers the reply and its end-of-turn token, contiguously, and nothing else.
  target = [i for i, m in zip(ids, mask) if m]
  assert mask == [0] * len(prompt) + [1] * len(target) + [0] * (len(ids) - len(prompt) - len(target))
  end_token = "<|im_end|>" if template == "qwen" else "<|eot_id|>"
  reply = conversation.reply if template == "qwen" else conversation.reply.strip()
  assert ours.decode(target) == reply + end_token
  if record["objective"] == "cft":
    assert reply.startswith("Critique:\n") and objectives.CFT_INSTRUCTION + "\nQuestion:\n" in messages[-2]["content"]


def test_reply_starting_with_a_newline_keeps_the_generation_prompt(tmp_path, tokenizer_json):
  """Whole-text tokenization would merge the header's "\n" with the reply's; we keep the
  prompt intact (documented exception), so only the ids differ, never the text."""
  model_dir = _model_dir(tmp_path, tokenizer_json, "qwen")
  ours = load_tokenizer(model_dir)
  reference = transformers.AutoTokenizer.from_pretrained(model_dir)
  conversation = Conversation((Turn("user", "Go on."),), "\nStep 2:")
  ids, mask = chat_templates.encode(conversation, "qwen", ours)
  prompt = chat_templates.prompt_ids(conversation.context, "qwen", ours)
  assert ids[: len(prompt)] == prompt and mask.index(1) == len(prompt)
  assert ours.decode(ids) == reference.decode(_hf_ids(reference, _messages(conversation)))
  assert ours.decode(ids[len(prompt) :]) == "\nStep 2:<|im_end|>\n"


def test_qwen_default_and_explicit_system_prompts(tmp_path, tokenizer_json):
  ours = load_tokenizer(_model_dir(tmp_path, tokenizer_json, "qwen"))
  context = (Turn("user", "What is 12 + 30?"),)
  default = ours.decode(chat_templates.prompt_ids(context, "qwen", ours))
  assert default.startswith(f"<|im_start|>system\n{chat_templates.QWEN_DEFAULT_SYSTEM}<|im_end|>\n")
  custom = ours.decode(chat_templates.prompt_ids(context, "qwen", ours, default_system="Reason step by step."))
  assert custom.startswith("<|im_start|>system\nReason step by step.<|im_end|>\n")
  assert custom.endswith("<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n")


def test_plain_template_frames_with_bos_and_eos(tmp_path, tokenizer_json):
  ours = load_tokenizer(_model_dir(tmp_path, tokenizer_json, "llama3"))
  ids, mask = chat_templates.encode(Conversation((Turn("user", "What is 12 + 30?"),), "42"), "plain", ours)
  assert ids[0] == ours.bos_id and ids[-1] == ours.eos_id
  assert ours.decode([i for i, m in zip(ids, mask) if m]) == "42<|eot_id|>"
  assert ours.decode([i for i, m in zip(ids, mask) if not m]) == "<|begin_of_text|>What is 12 + 30?\n"


def test_unknown_template_is_a_config_error(tmp_path, tokenizer_json):
  ours = load_tokenizer(_model_dir(tmp_path, tokenizer_json, "qwen"))
  with pytest.raises(ValueError, match="data.chat_template='chatml'"):
    chat_templates.encode(Conversation((Turn("user", "hi"),), "hello"), "chatml", ours)


def test_llama3_1_system_block_carries_the_dates_and_the_default_system(tmp_path, tokenizer_json):
  ours = load_tokenizer(_model_dir(tmp_path, tokenizer_json, "llama3_1"))
  context = (Turn("user", "What is 12 + 30?"),)
  dated = (
      "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
      "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
  )
  assert ours.decode(chat_templates.prompt_ids(context, "llama3_1", ours)).startswith(dated + "<|eot_id|>")
  custom = ours.decode(chat_templates.prompt_ids(context, "llama3_1", ours, default_system="Be brief."))
  assert custom.startswith(dated + "Be brief.<|eot_id|><|start_header_id|>user")
