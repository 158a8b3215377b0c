"""Hugging Face checkpoints in and out.

  config          config.json <-> model config (hf_model_config beside its inverse hf_config_dict)
  safetensors_io  the safetensors codec
  layout          which HF tensor feeds each parameter; one table of layout kinds
  convert         import (params, checkpoint) and export (safetensors, checkpoint)

The public API is re-exported here: `from cftjax import hf; hf.import_params(...)`.

Supported architectures: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM.

Import places every parameter straight onto its target sharding: for each device shard
the matching rows of the needed layer tensors are read from the safetensors file(s) with
positioned reads, converted to our layout and sent to that device, so the host holds one
shard (plus one layer block) at a time and never the whole model. Export gathers one
layer tensor at a time and streams it into sharded safetensors files.

Files are read and written with a small built-in safetensors codec (8-byte header size,
JSON header, raw little-endian data): it handles bfloat16 through ml_dtypes (numpy has
no bf16), reads only the byte ranges a shard needs and writes a file without holding it
in memory. Anything unexpected (missing file, unknown tensor, wrong shape, unsupported
config option) raises an error naming the file and the tensor or field.

Mistral's sliding window is imported as `model.sliding_window`. Qwen2's
`use_sliding_window` (a window on only some layers) is not implemented: full causal
attention agrees with it for sequences no longer than the window, so import warns, and
`hf_model_config(..., max_length=N)` refuses N above the window.
"""

from cftjax.hf.config import (  # noqa: F401
    ARCHITECTURES,
    FAMILY_TO_HF,
    read_hf_config,
    hf_family,
    hf_model_config,
    hf_config_dict,
    check_model_config,
    model_config_family,
)
from cftjax.hf.safetensors_io import (  # noqa: F401
    SINGLE_FILE,
    INDEX_FILE,
    DTYPES,
    DTYPE_NAMES,
    FLOAT_DTYPE_NAMES,
    LOADABLE_DTYPES,
    TensorInfo,
    read_safetensors_header,
    index_hf_tensors,
    read_rows,
    write_safetensors,
)
from cftjax.hf.layout import (  # noqa: F401
    IGNORED_SUFFIXES,
    ParamSource,
    param_sources,
    LayoutKind,
    LAYOUT_KINDS,
    layout_kind,
    hf_shape,
    to_hf_layout,
    hf_block_ranges,
    from_hf_block,
    read_hf_block,
    transpose_2d,
    read_block,
)
from cftjax.hf.convert import (  # noqa: F401
    TOKENIZER_FILES,
    TOKENIZER_SUBDIR,
    SOURCE_CONFIG_NAME,
    DEFAULT_MAX_SHARD_BYTES,
    model_abstract_params,
    import_params,
    require_empty_dir,
    copy_tokenizer_files,
    import_to_checkpoint,
    save_hf_weights,
    export_checkpoint,
)
