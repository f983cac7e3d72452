"""The embedded world: everything the project creates itself so that it runs offline.

* :mod:`abmll_tune.embedded.suite` - the embedded task suite (concept tasks in a small
  made-up language, in MetaICL's file format) and its byte-level BPE tokenizer;
* :mod:`abmll_tune.embedded.backbone` - tiny Llama3 / Qwen2 backbones written as HF
  checkpoints (``python -m abmll_tune.embedded.backbone --out DIR``), optionally
  briefly pre-trained on the suite's language;
* :mod:`abmll_tune.embedded.pretrain` - that brief pre-training.

Tests, the CPU demo (``make demo``) and the benchmarks run on it; real models and data go
through :mod:`abmll_tune.models` and :mod:`abmll_tune.data` unchanged.
"""
