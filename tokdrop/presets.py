"""Model sizes and training modes by name. Plain data without imports, so that command-line
parsers can offer them without loading torch."""

# Training modes of a masked-LM model, as tokdrop.config.with_mode builds them.
MODES = ("dense", "token_drop", "narrow", "random_ltd")

# Sizes as BertConfig fields.

PRESETS: dict[str, dict[str, int]] = {
    # Google's BERT miniatures (Turc et al. 2019).
    "tiny": {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 2, "intermediate_size": 512},
    "mini": {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 4, "intermediate_size": 1024},
    "small": {"num_hidden_layers": 4, "hidden_size": 512, "num_attention_heads": 8, "intermediate_size": 2048},
    "medium": {"num_hidden_layers": 8, "hidden_size": 512, "num_attention_heads": 8, "intermediate_size": 2048},
    # The shapes of sentence-transformers' all-MiniLM models.
    "minilm-l6": {"num_hidden_layers": 6, "hidden_size": 384, "num_attention_heads": 12, "intermediate_size": 1536},
    "minilm-l12": {"num_hidden_layers": 12, "hidden_size": 384, "num_attention_heads": 12, "intermediate_size": 1536},
    "base": {"num_hidden_layers": 12, "hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072},
    "large": {"num_hidden_layers": 24, "hidden_size": 1024, "num_attention_heads": 16, "intermediate_size": 4096},
}
