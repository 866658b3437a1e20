"""Model card templates shipped with hf_fdiv (importable as ``hf_fdiv.model_cards``)."""
