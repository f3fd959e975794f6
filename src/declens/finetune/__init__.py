"""Fine-tuning of (pruned) models: one recipe (:mod:`.config`), training rows that never include
evaluated rows (:mod:`.data`), LoRA / full set-up, merge and export (:mod:`.setup`), and the
``transformers.Trainer`` loop with the learning-rate selection (:mod:`.train`).

Example:
    >>> pm = pruned_copy(lm, [20, 21, 22])
    >>> seqs = training_sequences(pm, load_training_data("arc_easy", limit=256), "cloze")
    >>> log = run_finetune(pm, seqs, FinetuneConfig(method="lora", epochs=1, lr_candidates=(1e-4, 2e-4, 5e-4)))
    >>> log.lr_search["chosen"], log.losses[-1]
"""

from .config import DEFAULT_LR, DEFAULT_LR_CANDIDATES, LR_RULE, FinetuneConfig, parse_floats
from .data import (TRAINABLE_TASKS, TrainData, TrainSeq, exclude_evaluated, load_training_data, sequence_stats,
                   training_mixture, training_sequences, training_split)
from .setup import copy_model, export_model, merge_lora, original_num_layers, pruned_copy, state_copy
from .train import TrainLog, answer_loss, choose_lr, finetune, heldout_split, run_finetune, select_lr

__all__ = ["DEFAULT_LR", "DEFAULT_LR_CANDIDATES", "FinetuneConfig", "LR_RULE", "TRAINABLE_TASKS", "TrainData", "TrainLog",
           "TrainSeq", "answer_loss", "choose_lr", "copy_model", "exclude_evaluated", "export_model", "finetune",
           "heldout_split", "load_training_data", "merge_lora", "original_num_layers", "parse_floats", "pruned_copy",
           "run_finetune", "select_lr", "sequence_stats", "state_copy", "training_mixture", "training_sequences", "training_split"]
