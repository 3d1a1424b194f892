"""The signature every export shares. Every exported graph takes

    input_ids       int64 [batch_size, sequence_length]
    attention_mask  int64 [batch_size, sequence_length]   1 = token, 0 = padding (right padding)
    token_type_ids  int64 [batch_size, sequence_length]

with `batch_size` and `sequence_length` dynamic and shared by the three inputs, and returns, by head,

    encoder      last_hidden_state float [B, S, H], pooler_output float [B, H] (when the model has a pooler)
    classifier   logits float [B, num_labels]            (full-sequence encoder, [CLS] pooler)
    embedding    sentence_embedding float [B, H]         (mean of the real tokens' last hidden states)
    narrow-cls   logits float [B, num_labels]            (NarrowBERT: [CLS] is the only query of the
                                                          narrow layers; explicit opt-in)

Outputs are float32 whatever the compute dtype. This module imports no torch, so that the command
line builds its parser fast.
"""

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
HEADS = ("encoder", "classifier", "embedding", "narrow-cls")
DTYPE_NAMES = ("fp32", "fp16", "bf16")
FORMATS = ("onnx", "aoti", "tensorrt")
BATCH_DIM, SEQ_DIM = "batch_size", "sequence_length"
