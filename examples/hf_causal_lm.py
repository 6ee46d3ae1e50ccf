"""A Hugging Face causal language model for bsfind, built offline.

    bsfind validate examples/hf-causal-lm.yaml
    bsfind recommend examples/hf-causal-lm.yaml

GPT-2 from a config (random weights: nothing is downloaded) on byte windows of
Python's own standard-library source. The model computes its own loss from
``labels`` (the spec says ``loss: model``), so the dataset's targets are the
input ids themselves: Hugging Face shifts them inside the model.
"""

from __future__ import annotations

from torch.utils.data import TensorDataset
from transformers import GPT2Config, GPT2LMHeadModel

from bsfind.data import text


def gpt2(layers: int = 2, width: int = 64, heads: int = 4, context: int = 32,
         dropout: float = 0.1) -> GPT2LMHeadModel:
    """A small GPT-2 (tied input/output embeddings, as GPT-2 always has) over 128 byte ids."""
    config = GPT2Config(vocab_size=128, n_positions=context, n_embd=width, n_layer=layers,
                        n_head=heads, resid_pdrop=dropout, embd_pdrop=dropout,
                        attn_pdrop=dropout, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    # transformers reads the loss from the model's class name, which names none for
    # GPT2LMHeadModel: say it, or every first loss warns "loss_type=None ... unrecognized"
    model.loss_type = "ForCausalLM"
    return model


def windows(context: int = 32, max_chars: int = 100_000) -> TensorDataset:
    """(input ids, labels) pairs: each window twice, since the model shifts the labels."""
    ids = text(context=context, max_chars=max_chars).tensors[0]
    return TensorDataset(ids, ids)
