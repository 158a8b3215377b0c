"""A model's own chat template: ids and loss mask against transformers' apply_chat_template.

Each template is written here twice, identical text with and without {% generation %} tags
around the assistant content: the tagged twin gives transformers' assistant mask, the
reference for both our tagged rendering and our prefix-based location of the reply in the
untagged one. Tokenizers are built in the test with `tokenizers` (byte-level BPE for the
ChatML / Llama 3 families, Metaspace for Mistral's [INST] format).
"""

import json

import pytest

from cftjax import chat_templates, jinja_template, objectives
from cftjax.chat_templates import Conversation, Turn
from cftjax.data.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

G, EG = "<<G>>", "<<EG>>"  # where {% generation %} / {% endgeneration %} go in the tagged twin

CHATML_DEFAULT_SYSTEM = (  # Qwen2.5's: a default system prompt when the conversation has none
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}<<G>>{{- message.content + '<|im_end|>' }}<<EG>>{{- '\\n' }}"
    "{%- elif message.role == 'user' or not loop.first %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
MISTRAL_INST = (  # Mistral / Mixtral Instruct: system folded into the first [INST], replies end with </s>
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message is defined %}"
    "{{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- ' [INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}<<G>>{{- ' ' + message['content'] + eos_token }}<<EG>>"
    "{%- endif %}{%- endfor %}"
)
LLAMA3 = (  # Llama 3 Instruct
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% if message['role'] == 'assistant' %}<<G>>{{ message['content'] | trim + '<|eot_id|>' }}<<EG>>"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# Written over several indented lines, as template files are: trim_blocks and lstrip_blocks
# must drop exactly that layout.
LLAMA3 = LLAMA3.replace("%}{%", "%}\n  {%")
PHI3 = (  # Phi-3 style: the turn ends with <|end|>, which is not the EOS token
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|assistant|>\n' }}<<G>>{{ message['content'] + '<|end|>' }}<<EG>>"
    "{{ '\n' }}{% else %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
TEMPLATES = {"chatml": CHATML_DEFAULT_SYSTEM, "mistral": MISTRAL_INST, "llama3": LLAMA3, "phi3": PHI3}
SPECIALS = {
    "chatml": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None},
    "mistral": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "phi3": {"eos_token": "<|endoftext|>"},
}
END_OF_TURN = {"chatml": "<|im_end|>", "mistral": "</s>", "llama3": "<|eot_id|>", "phi3": "<|end|>"}
SPECIAL_TOKENS = [
    "<unk>",
    "<s>",
    "</s>",
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
    "<|end|>",
]
CORPUS = [
    "Question: What is 12 + 30? Solution: 12 + 30 = 42. The answer is 42.",
    "Please critique whether the following solution to the question is correct.",
    "Critique: The solution adds the numbers correctly.\nConclusion: right",
    "You are a careful tutor. Let x = 3; then 2x + 1 = 7. [INST] [/INST]",
    "Step 1:\n\nStep 2:\n\n",
] * 5

CONVERSATIONS = {
    "single": Conversation((Turn("user", "What is 12 + 30?"),), "12 + 30 = 42.\nThe answer is 42."),
    "system": Conversation(
        (Turn("system", "You are a careful tutor."), Turn("user", "What is 12 + 30?")), "The answer is 42."
    ),
    "history": Conversation(
        (Turn("user", "Let x be 3."), Turn("assistant", "Sure, x = 3."), Turn("user", "Then 2x + 1?")), "2x + 1 = 7."
    ),
    "system_history": Conversation(
        (
            Turn("system", "You are a careful tutor."),
            Turn("user", "Let x be 3."),
            Turn("assistant", "Sure."),
            Turn("user", "Then 2x + 1?"),
        ),
        "  It is 7. ",
    ),
}


def _tokenizer(kind: str) -> tokenizers.Tokenizer:
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>" if kind == "mistral" else None))
  if kind == "mistral":
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = tokenizers.decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    alphabet = []
  else:
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=420, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet, show_progress=False
  )
  tok.train_from_iterator(CORPUS, trainer)
  return tok


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
  """name -> (dir with the untagged template, dir with the tagged twin)."""
  built = {"bpe": _tokenizer("bpe"), "mistral": _tokenizer("mistral")}
  dirs = {}
  for name, source in TEMPLATES.items():
    pair = []
    for tagged in (False, True):
      directory = tmp_path_factory.mktemp(f"{name}_{'tagged' if tagged else 'plain'}")
      built["mistral" if name == "mistral" else "bpe"].save(str(directory / "tokenizer.json"))
      template = source.replace(G, "{% generation %}" if tagged else "").replace(
          EG, "{% endgeneration %}" if tagged else ""
      )
      config = {**SPECIALS[name], "chat_template": template, "tokenizer_class": "PreTrainedTokenizerFast"}
      (directory / "tokenizer_config.json").write_text(json.dumps(config))
      pair.append(directory)
    dirs[name] = tuple(pair)
  return dirs


def _messages(turns):
  return [{"role": t.role, "content": t.content} for t in turns]


def _last_run(mask):
  """Only the last run of ones: the final reply (earlier assistant turns are context here)."""
  end = len(mask) - mask[::-1].index(1)
  start = end
  while start > 0 and mask[start - 1]:
    start -= 1
  return [int(start <= i < end) for i in range(len(mask))]


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_own_template_ids_and_mask_equal_apply_chat_template(model_dirs, name, conversation):
  untagged_dir, tagged_dir = model_dirs[name]
  conv = CONVERSATIONS[conversation]
  messages = _messages(conv.context) + [{"role": "assistant", "content": conv.reply}]
  reference = transformers.AutoTokenizer.from_pretrained(tagged_dir)
  expected = reference.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
  expected_ids, expected_mask = list(expected["input_ids"]), list(expected["assistant_masks"])
  untagged = transformers.AutoTokenizer.from_pretrained(untagged_dir)
  assert list(untagged.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]) == expected_ids
  if "history" not in conversation:
    assert expected_mask == _last_run(expected_mask)  # one assistant turn: transformers' mask as it is
  for directory in (tagged_dir, untagged_dir):
    ours = load_tokenizer(directory)
    ids, mask = chat_templates.encode(conv, "model", ours)
    assert ids == expected_ids
    assert mask == _last_run(expected_mask)
    prompt = list(
        reference.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True, return_dict=True)[
            "input_ids"
        ]
    )
    assert chat_templates.prompt_ids(conv.context, "model", ours) == prompt
  # Not vacuous: the mask holds the reply and the end-of-turn token, nothing of the prompt.
  target = ours.decode([i for i, m in zip(ids, mask) if m])
  end = END_OF_TURN[name]
  assert target.endswith(end) and conv.reply.strip() in target and "user" not in target


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_generation_stops_at_the_templates_end_of_turn_token(model_dirs, name):
  ours = load_tokenizer(model_dirs[name][0])
  assert jinja_template.end_of_turn_text(jinja_template.load(model_dirs[name][0])) == END_OF_TURN[name]
  assert chat_templates.end_of_turn_ids("model", ours) == (ours.token_to_id(END_OF_TURN[name]),)
  if name == "phi3":  # neither EOS nor a generation_config id: only the template says so
    assert ours.token_to_id("<|end|>") not in ours.stop_ids
  import ml_collections

  from cftjax import evaluate

  config = ml_collections.ConfigDict({"data": {"chat_template": "model"}})
  sampling = evaluate.sampling_for(evaluate.LoadedModel(None, None, config, ours, None), max_new_tokens=4)
  assert ours.token_to_id(END_OF_TURN[name]) in sampling.eos_ids


def test_training_records_use_the_model_template(model_dirs):
  record = {
      "objective": "cft",
      "query": "What is 12 + 30?",
      "response": "12 + 30 = 52.",
      "critique": "Wrong sum.\nConclusion: wrong",
      "system": "",
      "history": "[]",
      "answer": "42",
      "label": "wrong",
  }
  directory = model_dirs["chatml"][0]
  ours = load_tokenizer(directory)
  ids, mask = objectives.encode_example(record, ours, "model")
  reference = transformers.AutoTokenizer.from_pretrained(directory)
  conv = objectives.to_conversation(record)
  messages = _messages(conv.context) + [{"role": "assistant", "content": conv.reply}]
  assert ids == list(reference.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
  text = ours.decode(ids)
  assert "You are a helpful assistant." in text  # the template's own default system prompt
  assert ours.decode([i for i, m in zip(ids, mask) if m]) == "Critique:\nWrong sum.\nConclusion: wrong<|im_end|>"
  # data.system_prompt fills the system turn when the record has none.
  ids, _ = objectives.encode_example(record, ours, "model", default_system="Be brief.")
  assert "<|im_start|>system\nBe brief.<|im_end|>" in ours.decode(ids)


def test_template_files_precedence_and_errors(tmp_path):
  (tmp_path / "tokenizer_config.json").write_text(
      json.dumps({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]})
  )
  assert jinja_template.find_template(tmp_path)[0] == "D"
  (tmp_path / "chat_template.jinja").write_text("J")
  assert jinja_template.find_template(tmp_path) == ("J", tmp_path / "chat_template.jinja")
  empty = tmp_path / "none"
  empty.mkdir()
  (empty / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
  assert jinja_template.find_template(empty) is None
  (empty / "tokenizer.json").write_text(_tokenizer("bpe").to_str())
  with pytest.raises(ValueError, match="has no chat template"):
    chat_templates.encode(Conversation((Turn("user", "q"),), "r"), "model", load_tokenizer(empty))


def test_template_errors_name_the_file(model_dirs):
  ours = load_tokenizer(model_dirs["mistral"][0])
  bad = Conversation((Turn("user", "a"), Turn("user", "b")), "r")  # roles do not alternate
  with pytest.raises(ValueError, match=r"tokenizer_config.json: Conversation roles must alternate"):
    chat_templates.encode(bad, "model", ours)
  assert "the model's own, from tokenizer_config.json" in chat_templates.describe("model", model_dirs["mistral"][0])


def test_imported_chat_model_is_prompted_in_its_own_template(model_dirs, tmp_path):
  """The issue's case: a Llama-architecture chat model whose template is ChatML. Import picks
  its template, and greedy answers to the eval prompt equal transformers' from apply_chat_template."""
  import jax
  import ml_collections
  import torch

  from cftjax import evaluate, hf, sharding
  from configs import base

  source = model_dirs["chatml"][0]
  hf_dir = tmp_path / "hf"
  reference_tok = transformers.AutoTokenizer.from_pretrained(source)
  config = transformers.LlamaConfig(
      vocab_size=len(reference_tok),
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      max_position_embeddings=256,
      eos_token_id=reference_tok.eos_token_id,
  )
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.3)
  model.save_pretrained(hf_dir)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    (hf_dir / name).write_bytes((source / name).read_bytes())
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)), jax.devices()[:1])
  saved = hf.import_to_checkpoint(hf_dir, tmp_path / "ckpt", mesh, base.get_config())
  assert saved.data.chat_template == "model"

  loaded = evaluate.load(tmp_path / "ckpt", devices=jax.devices()[:1])
  sampling = evaluate.sampling_for(loaded, max_new_tokens=6)
  for question in ("Let x be 3. Then 2x + 1?",):
    messages = [{"role": "system", "content": "Reason step by step."}, {"role": "user", "content": question}]
    expected_prompt = list(
        reference_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)[
            "input_ids"
        ]
    )
    prompt = evaluate.answer_prompt(question, loaded, system="Reason step by step.")
    assert prompt == expected_prompt
    ours = evaluate.generate_texts(loaded, [prompt], sampling, batch_size=1, progress=False)[0]
    with torch.no_grad():
      out = model.generate(
          torch.tensor([prompt]),
          max_new_tokens=6,
          do_sample=False,
          eos_token_id=list(sampling.eos_ids),
          pad_token_id=sampling.pad_id,
      )
    theirs = reference_tok.decode(out[0, len(prompt) :], skip_special_tokens=False)
    assert ours == theirs.split("<|im_end|>")[0] and ours  # six tokens of random text, the same
