"""SmolLM2-135M's config.json and tokenizer files, made from its GGUF (with SmolLM2's own
pre-tokenizer, as tests/reference/conftest.py does): what `make gpu-bundle` carries to the GPU
machine, and what gpu_check.py's dry run makes for itself in a checkout without a bundle.

    python tests/gpu/smollm2_files.py GGUF OUT_DIR
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "reference"))
from conftest import smollm2_pre_tokenizer  # noqa: E402
from transformers import AutoConfig, AutoTokenizer  # noqa: E402

gguf, out = sys.argv[1], sys.argv[2]
d, f = os.path.dirname(gguf), os.path.basename(gguf)
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
tok.backend_tokenizer.pre_tokenizer = smollm2_pre_tokenizer()
tok.save_pretrained(out)
cfg = AutoConfig.from_pretrained(d, gguf_file=f).to_dict()
keep = ["architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
        "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
        "rope_theta", "rope_parameters", "max_position_embeddings", "tie_word_embeddings",
        "bos_token_id", "eos_token_id", "hidden_act", "initializer_range"]
cfg = {k: cfg[k] for k in keep if cfg.get(k) is not None}
cfg.setdefault("architectures", ["LlamaForCausalLM"])
with open(os.path.join(out, "config.json"), "w") as fh:
    json.dump(cfg, fh, indent=2)
