"""
The CPU demo's support code (not part of ReMatch itself):

  demo/synthetic.py  the built-in synthetic benchmark (coloured shapes in MMEB's schema)
  demo/corpus.py     the strings the tiny offline tokenizer is trained on

`python train.py` without --train_data writes the benchmark and trains on it.
"""
from demo.corpus import tokenizer_corpus
from demo.synthetic import (DEMO_BINDING_TASKS, DEMO_EVAL_TASKS, DEMO_META, DEMO_TRAIN_SUBSETS,
                            make_synthetic)

__all__ = ["DEMO_BINDING_TASKS", "DEMO_EVAL_TASKS", "DEMO_META", "DEMO_TRAIN_SUBSETS", "make_synthetic", "tokenizer_corpus"]
